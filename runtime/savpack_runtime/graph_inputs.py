"""Host-side planning for the truncated graphs: the preprocessed tensors in, the graph's input feed out (numpy only).

Everything whose *shape* depends on the data (how many patches each image has, how LLaVA-OneVision's anyres feature
map is cropped and resized, where each image token's features come from, Qwen2-VL's M-RoPE positions) is planned
here, as small integer index tensors, so the graph itself is plain dense arithmetic with dynamic dimensions and no
data-dependent control flow (docs/decisions.md, "Planning graph inputs on the host"). The builder's export traces and
validates its graphs through this same module, so there is one implementation of each rule.

The rules mirror transformers' (5.x) Qwen2VLModel.get_rope_index, get_vision_position_ids, get_vision_window_index (Qwen2.5-VL), LlavaOnevisionModel.
get_image_features / pack_image_features (select_best_resolution is image_processing.best_resolution); the export validation compares graphs fed by
this module with hooks on the real Hugging Face model, and tests/test_graph_inputs.py compares rule by rule.

Shapes: B items, S tokens, N images, P patches per image (padded), D feature width.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .errors import InputError
from .image_processing import anyres_max_patches, anyres_tile_features, best_resolution

# Graph kinds: which planner feeds a graph.
TEXT = "text"
QWEN2_VL = "qwen2_vl"
QWEN2_5_VL = "qwen2_5_vl"
LLAVA_ONEVISION = "llava_onevision"
LLAVA = "llava"
QWEN3_VL = "qwen3_vl"
GEMMA3 = "gemma3"
IDEFICS3 = "idefics3"  # Idefics3 and SmolVLM
BERT = "bert"
TEXT_KINDS = (TEXT, BERT)  # graphs that take no images

# The graph contract: per graph kind (which planner feeds it), the inputs in order with their dynamic axes.
_BATCH_SEQUENCE = {0: "batch", 1: "sequence"}
_PER_IMAGE = {0: "images", 1: "image_patches"}
_PER_WINDOW = {0: "windows", 1: "window_patches"}
_QWEN2_VL_INPUTS = {"input_ids": _BATCH_SEQUENCE, "attention_mask": _BATCH_SEQUENCE, "pixel_values": {0: "patches"},
                    "patch_index": _PER_IMAGE, "patch_mask": _PER_IMAGE, "patch_positions": _PER_IMAGE,
                    "position_ids": {1: "batch", 2: "sequence"}, "image_token_index": _BATCH_SEQUENCE}
GRAPH_INPUTS: dict[str, dict[str, dict[int, str]]] = {
    TEXT: {"input_ids": _BATCH_SEQUENCE, "attention_mask": _BATCH_SEQUENCE},
    # BERT encoders: the tokenizer's segment ids besides; heads at the first or last real token (plan token_position).
    BERT: {"input_ids": _BATCH_SEQUENCE, "attention_mask": _BATCH_SEQUENCE, "token_type_ids": _BATCH_SEQUENCE},
    # pixel_values (all patches, C*T*P*P) as the processor gives them; patch_index/patch_mask (N, P) lay them out per
    # image; patch_positions (N, P, 2) their (row, column) rotary ids; position_ids (3, B, S) the M-RoPE positions;
    # image_token_index (B, S) the merged image feature (flattened over N x P/4) each image token receives.
    QWEN2_VL: _QWEN2_VL_INPUTS,
    # Qwen2-VL's inputs, then the windows of the vision tower's window-attention blocks: window_index / window_mask
    # (W, Pw) each window's patches (flattened over N x P), padded; window_inverse (N, P) where each patch of the image
    # layout sits in the window layout (flattened over W x Pw).
    QWEN2_5_VL: {"input_ids": _BATCH_SEQUENCE, "attention_mask": _BATCH_SEQUENCE, "pixel_values": {0: "patches"},
                 "patch_index": _PER_IMAGE, "patch_mask": _PER_IMAGE, "patch_positions": _PER_IMAGE,
                 "position_ids": {1: "batch", 2: "sequence"}, "image_token_index": _BATCH_SEQUENCE,
                 "window_index": _PER_WINDOW, "window_mask": _PER_WINDOW, "window_inverse": _PER_IMAGE},
    # pixel_values (N, C, H, W) at the vision tower's size, as the processor gives them; the image features take the
    # image tokens in order inside the graph.
    LLAVA: {"input_ids": _BATCH_SEQUENCE, "attention_mask": _BATCH_SEQUENCE, "pixel_values": {0: "images"}},
    # Gemma 3 takes its images as LLaVA-1.5 does (one size, features filling the image tokens in order); the tokens of
    # one image attend to each other, which the graph finds from input_ids.
    GEMMA3: {"input_ids": _BATCH_SEQUENCE, "attention_mask": _BATCH_SEQUENCE, "pixel_values": {0: "images"}},
    # Qwen2-VL's inputs, then each patch's bilinear taps (index, weight) into the learned position-embedding grid, in
    # the processor's patch order.
    QWEN3_VL: {**_QWEN2_VL_INPUTS, "position_embed_index": {0: "patches"}, "position_embed_weight": {0: "patches"}},
    # pixel_values (T, C, F, F): the real frames of the batch (tiles and global views), item after item; the frames'
    # features take the image tokens in order.
    IDEFICS3: {"input_ids": _BATCH_SEQUENCE, "attention_mask": _BATCH_SEQUENCE, "pixel_values": {0: "frames"}},
    # pixel_values (N, tiles, C, H, W) as the processor gives them; tile_index (T,) the tiles to encode (flattened over
    # N x tiles); image_token_index / image_token_weight (B, S, 4): each image token is a weighted sum of up to four
    # rows of the tile features (flattened over T x tokens per tile, then one row for the image_newline vector).
    LLAVA_ONEVISION: {"input_ids": _BATCH_SEQUENCE, "attention_mask": _BATCH_SEQUENCE,
                      "pixel_values": {0: "images", 1: "tiles_per_image"}, "tile_index": {0: "tiles"},
                      "image_token_index": _BATCH_SEQUENCE, "image_token_weight": _BATCH_SEQUENCE},
}
OUTPUT_NAME = "head_vectors"  # (B, k, head_dim) float32
OUTPUT_AXES = {0: "batch"}
# The classifier inside the graph (bundle format 2): per pack, in the bundle's pack order, these outputs (batch
# first; savpack.export.scores): cosines (B, k, C) float32, votes (B, C) int64, prediction (B,) int64 the pack's label,
# probabilities (B, C) float32 its scoring model's (a format-1 pack's: the vote shares).
SCORE_ROLES = ("cosines", "votes", "prediction", "probabilities")
# Format-2 bundles written before the probabilities moved into the graph name only these (and their probe packs'
# prediction is the vote's): readers accept them and compute the probabilities in numpy.
REQUIRED_SCORE_ROLES = ("cosines", "votes", "prediction")


def score_outputs(pack_index: int) -> dict[str, str]:
    """The graph output name of each scoring role of the bundle's pack number `pack_index`."""
    return {role: f"pack{pack_index}.{role}" for role in SCORE_ROLES}


def input_names(kind: str) -> tuple[str, ...]:
    return tuple(GRAPH_INPUTS[kind])


def plan(kind: str, config: dict[str, Any], encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph's input feed for a batch encoded by the preprocessor (the same tensors LoadedModel.encode returns)."""
    if kind not in _PLANNERS:
        raise InputError(f"graph kind {kind!r} is not one of {sorted(_PLANNERS)}")
    input_ids = _int_array(encoded, "input_ids", 2)
    attention_mask = _int_array(encoded, "attention_mask", 2)
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(input_ids.shape)}")
    if not attention_mask[:, -1].all() and not attention_mask[:, 0].all():
        raise InputError("attention_mask: every row must end with a real token (left padding) or start with one")
    feed = {"input_ids": input_ids, "attention_mask": attention_mask}
    feed.update(_PLANNERS[kind](config, encoded, input_ids, attention_mask))
    return feed


def _plan_text(config: dict[str, Any], encoded: dict[str, np.ndarray], input_ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    return {}


def _plan_bert(config: dict[str, Any], encoded: dict[str, np.ndarray], input_ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    token_type_ids = encoded.get("token_type_ids")
    token_type_ids = np.zeros_like(input_ids) if token_type_ids is None else _int_array(encoded, "token_type_ids", 2)
    if token_type_ids.shape != input_ids.shape:
        raise InputError(f"token_type_ids has shape {list(token_type_ids.shape)}, input_ids {list(input_ids.shape)}")
    return {"token_type_ids": token_type_ids}


# -- Qwen2-VL --------------------------------------------------------------------------------------------------------


def _plan_qwen2_vl(config: dict[str, Any], encoded: dict[str, np.ndarray], input_ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    merge = int(config["spatial_merge_size"])
    image_token_id = int(config["image_token_id"])
    grid = _int_array(encoded, "image_grid_thw", 2)
    pixel_values = _float_array(encoded, "pixel_values", 2)
    if grid.shape[1] != 3 or (grid < 1).any():
        raise InputError(f"image_grid_thw must be (images, 3) of positive (t, h, w), got {grid.tolist()}")
    if (grid[:, 1:] % merge).any():
        raise InputError(f"image_grid_thw {grid.tolist()}: heights and widths must be multiples of the merge size {merge}")
    lengths = grid.prod(axis=1)  # (N,) patches per image
    if lengths.sum() != pixel_values.shape[0]:
        raise InputError(f"pixel_values holds {pixel_values.shape[0]} patches, image_grid_thw describes {int(lengths.sum())}")
    token_type = encoded.get("mm_token_type_ids")
    token_type = (input_ids == image_token_id).astype(np.int64) if token_type is None else _int_array(encoded, "mm_token_type_ids", 2)
    if token_type.shape != input_ids.shape or (token_type > 1).any():
        raise InputError("mm_token_type_ids must match input_ids in shape and mark images only (videos are not supported)")

    count, longest = len(grid), int(lengths.max())
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    steps = np.arange(longest)
    patch_mask = steps[None, :] < lengths[:, None]  # (N, P)
    patch_index = offsets[:, None] + np.minimum(steps[None, :], lengths[:, None] - 1)  # padding repeats a real patch
    patch_positions = np.zeros((count, longest, 2), dtype=np.int64)
    for image, (t, h, w) in enumerate(grid.tolist()):
        patch_positions[image, : t * h * w] = vision_rotary_positions(t, h, w, merge)

    merged_per_image = longest // (merge * merge)
    image_tokens = input_ids == image_token_id
    merged = lengths // (merge * merge)
    sources = np.concatenate([image * merged_per_image + np.arange(n) for image, n in enumerate(merged.tolist())])
    if image_tokens.sum() != len(sources):
        raise InputError(f"input_ids hold {int(image_tokens.sum())} image tokens but the images give {len(sources)} features")
    image_token_index = np.zeros(input_ids.shape, dtype=np.int64)
    image_token_index[image_tokens] = sources  # row-major, as transformers' masked_scatter fills them
    return {
        "pixel_values": pixel_values, "patch_index": patch_index.astype(np.int64), "patch_mask": patch_mask,
        "patch_positions": patch_positions,
        "position_ids": mrope_position_ids(token_type, mask, grid, merge), "image_token_index": image_token_index,
    }


def vision_rotary_positions(t: int, h: int, w: int, merge: int) -> np.ndarray:
    """(t*h*w, 2) (row, column) of each patch, in the processor's order: merge x merge blocks row-major, t times."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=1), (t, 1))


def mrope_position_ids(token_type: np.ndarray, mask: np.ndarray, grid: np.ndarray, merge: int) -> np.ndarray:
    """(3, B, S) temporal/height/width positions: text counts on, each image's tokens form a (t, h, w) grid starting
    where the text stopped, and the text after it resumes at that start + max(h, w). Padding stays 0."""
    batch, length = token_type.shape
    positions = np.zeros((3, batch, length), dtype=np.int64)
    images = iter(grid.tolist())
    for row in range(batch):
        real = mask[row].astype(bool)
        types = token_type[row][real]
        starts = np.flatnonzero(np.diff(types, prepend=-1))
        ends = np.append(starts[1:], len(types))
        current, parts = 0, []
        for start, end in zip(starts.tolist(), ends.tolist()):
            if types[start] == 0:
                parts.append(np.broadcast_to(np.arange(end - start) + current, (3, end - start)))
                current += end - start
                continue
            try:
                t, h, w = next(images)
            except StopIteration:
                raise InputError("input_ids hold more image runs than image_grid_thw has images") from None
            gt, gh, gw = t, h // merge, w // merge
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            parts.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + current)
            current += max(h, w) // merge
        positions[:, row, real] = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
    return positions


# -- Qwen3-VL --------------------------------------------------------------------------------------------------------


def _plan_qwen3_vl(config: dict[str, Any], encoded: dict[str, np.ndarray], input_ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    feed = _plan_qwen2_vl(config, encoded, input_ids, mask)
    merge, side = int(config["spatial_merge_size"]), int(config["num_grid_per_side"])
    taps = [position_embedding_taps(t, h, w, merge, side) for t, h, w in _int_array(encoded, "image_grid_thw", 2).tolist()]
    return {**feed, "position_embed_index": np.concatenate([index for index, _ in taps]),
            "position_embed_weight": np.concatenate([weight for _, weight in taps])}


def position_embedding_taps(t: int, h: int, w: int, merge: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """One image's (t*h*w, 4) indices into the side x side learned position grid and bilinear weights, patches in the
    processor's order (merge x merge blocks row-major, t times): transformers' get_vision_interpolation_indices_and_weights
    with align_corners=True, in the same float32 operations."""
    rows, cols = vision_rotary_positions(t, h, w, merge).T

    def axis(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        source = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(source)
        taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
        weights = np.maximum(np.float32(1) - np.abs(source[:, None] - floor[:, None] - np.arange(2, dtype=np.float32)), np.float32(0))
        return taps, weights

    (row_taps, row_weights), (col_taps, col_weights) = axis(rows, h), axis(cols, w)
    index = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    weight = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4).astype(np.float32)
    return index, weight


# -- Qwen2.5-VL -----------------------------------------------------------------------------------------------------


def _plan_qwen2_5_vl(config: dict[str, Any], encoded: dict[str, np.ndarray], input_ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    feed = _plan_qwen2_vl(config, encoded, input_ids, mask)
    merge = int(config["spatial_merge_size"])
    units_per_side = int(config["window_size"]) // merge // int(config["patch_size"])
    images, longest = feed["patch_index"].shape
    windows = []  # per window: its patches as indices into the (N x P) image layout
    for image, (t, h, w) in enumerate(_int_array(encoded, "image_grid_thw", 2).tolist()):
        windows += [image * longest + patches for patches in vision_windows(t, h, w, merge, units_per_side)]
    window_length = max(len(patches) for patches in windows)
    window_index = np.zeros((len(windows), window_length), dtype=np.int64)  # padding repeats patch 0: masked
    window_mask = np.zeros((len(windows), window_length), dtype=bool)
    window_inverse = np.zeros((images, longest), dtype=np.int64)  # padding patches of the image layout read slot 0
    for number, patches in enumerate(windows):
        window_index[number, : len(patches)] = patches
        window_mask[number, : len(patches)] = True
        window_inverse.reshape(-1)[patches] = number * window_length + np.arange(len(patches))
    return {**feed, "window_index": window_index, "window_mask": window_mask, "window_inverse": window_inverse}


def vision_windows(t: int, h: int, w: int, merge: int, units_per_side: int) -> list[np.ndarray]:
    """One image's attention windows, in transformers' order (get_vision_window_index): squares of units_per_side^2
    merged units (merge x merge patches each), row by row per frame; each window lists its patches (indices in the
    processor's patch order, where a unit's merge^2 patches are consecutive), units row-major within it."""
    rows, cols = h // merge, w // merge
    frame, row, col = np.meshgrid(np.arange(t), np.arange(rows), np.arange(cols), indexing="ij")
    windows_per_row = -(-cols // units_per_side)
    windows_per_frame = -(-rows // units_per_side) * windows_per_row
    window = (frame * windows_per_frame + (row // units_per_side) * windows_per_row + col // units_per_side).reshape(-1)
    units = np.argsort(window, kind="stable")  # units in window order, row-major inside each window
    unit_patches = units[:, None] * merge * merge + np.arange(merge * merge)  # (units, merge^2)
    ends = np.cumsum(np.bincount(window))  # every window holds at least one unit
    return [part.reshape(-1) for part in np.split(unit_patches, ends[:-1])]


# -- LLaVA-1.5 -------------------------------------------------------------------------------------------------------


def _plan_llava(config: dict[str, Any], encoded: dict[str, np.ndarray], input_ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    pixel_values = _float_array(encoded, "pixel_values", 4)
    size = int(config["image_size"])
    if pixel_values.shape[2:] != (size, size):
        raise InputError(f"pixel_values has images of {list(pixel_values.shape[2:])} pixels; the vision tower takes {size}x{size}")
    expected = pixel_values.shape[0] * int(config["tokens_per_image"])
    found = int((input_ids == int(config["image_token_id"])).sum())
    if found != expected:
        raise InputError(f"input_ids hold {found} image tokens but the images give {expected} features")
    return {"pixel_values": pixel_values}


# -- Idefics3, SmolVLM -----------------------------------------------------------------------------------------------


def _plan_idefics3(config: dict[str, Any], encoded: dict[str, np.ndarray], input_ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The batch's real frames: transformers drops the all-zero padding frames; every real frame must be whole."""
    frame = int(config["frame_size"])
    pixel_values = _float_array(encoded, "pixel_values", 5)
    if pixel_values.shape[2:] != (3, frame, frame):
        raise InputError(f"pixel_values has frames of {list(pixel_values.shape[2:])}; the graph takes [3, {frame}, {frame}]")
    frames = pixel_values.reshape(-1, 3, frame, frame)
    real = (frames != 0).any(axis=(1, 2, 3))
    pixel_mask = encoded.get("pixel_attention_mask")
    if pixel_mask is not None:
        pixel_mask = _int_array(encoded, "pixel_attention_mask", 4).reshape(-1, frame, frame)
        if pixel_mask.shape[0] != len(frames) or not pixel_mask[real].all():
            raise InputError("pixel_attention_mask must mark every pixel of every real frame (frames are never cropped)")
    expected = int(real.sum()) * int(config["tokens_per_frame"])
    found = int((input_ids == int(config["image_token_id"])).sum())
    if found != expected:
        raise InputError(f"input_ids hold {found} image tokens but the frames give {expected} features")
    return {"pixel_values": np.ascontiguousarray(frames[real])}


# -- LLaVA-OneVision -------------------------------------------------------------------------------------------------


def _plan_llava_onevision(config: dict[str, Any], encoded: dict[str, np.ndarray], input_ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    image_token_id = int(config["image_token_id"])
    tile_size, patch = int(config["image_size"]), int(config["patch_size"])
    pinpoints = tuple(tuple(int(v) for v in point) for point in config["image_grid_pinpoints"])
    try:
        max_tiles = anyres_max_patches(config["vision_aspect_ratio"])
    except ValueError as exc:
        raise InputError(f"graph plan: {exc}") from None
    pixel_values = _float_array(encoded, "pixel_values", 5)
    sizes = _int_array(encoded, "image_sizes", 2)
    per_item = encoded.get("batch_num_images")
    per_item = np.ones(len(sizes), np.int64) if per_item is None else _int_array(encoded, "batch_num_images", 1)
    if per_item.sum() != len(sizes) or len(sizes) != pixel_values.shape[0]:
        raise InputError(f"batch_num_images {per_item.tolist()}, image_sizes ({len(sizes)}) and pixel_values "
                         f"({pixel_values.shape[0]} images) disagree")
    side = tile_size // patch  # feature rows (and columns) per tile
    per_tile = side * side

    tile_index, token_rows, token_weights = [], [], []
    tiles_so_far = 0
    patched = np.repeat(per_item == 1, per_item)  # transformers tiles an image only when it is its item's only image
    newline = None  # the newline row follows every tile feature: its index is known once all tiles are counted
    for image, ((height, width), tiled) in enumerate(zip(sizes.tolist(), patched.tolist())):
        if tiled:
            best = best_resolution((height, width), pinpoints)
            grid_rows, grid_cols = best[0] // tile_size, best[1] // tile_size
            tiles = 1 + grid_rows * grid_cols
        else:
            tiles = 1
        if tiles > pixel_values.shape[1]:
            raise InputError(f"image {image} needs {tiles} tiles but pixel_values holds {pixel_values.shape[1]} per image")
        tile_index.extend(image * pixel_values.shape[1] + np.arange(tiles))
        base = tiles_so_far * per_tile + np.arange(per_tile)
        token_rows.append(np.stack([base] + [base * 0] * 3, axis=1))
        token_weights.append(np.tile([1.0, 0, 0, 0], (per_tile, 1)))
        if tiled:
            rows, weights = _anyres_token_rows(tiles_so_far, grid_rows, grid_cols, side, (height, width), max_tiles)
            token_rows.append(rows)
            token_weights.append(weights)
        else:
            token_rows.append(np.full((1, 4), -1))  # the newline, resolved below
            token_weights.append(np.array([[1.0, 0, 0, 0]]))
        tiles_so_far += tiles
    newline = tiles_so_far * per_tile
    rows = np.concatenate(token_rows)
    rows = np.where(rows < 0, newline, rows)
    weights = np.concatenate(token_weights).astype(np.float32)

    image_tokens = input_ids == image_token_id
    if image_tokens.sum() != len(rows):
        raise InputError(f"input_ids hold {int(image_tokens.sum())} image tokens but the images give {len(rows)} features")
    index = np.zeros(input_ids.shape + (4,), dtype=np.int64)
    weight = np.zeros(input_ids.shape + (4,), dtype=np.float32)
    index[image_tokens], weight[image_tokens] = rows, weights
    return {"pixel_values": pixel_values, "tile_index": np.asarray(tile_index, dtype=np.int64),
            "image_token_index": index, "image_token_weight": weight}


def _anyres_token_rows(first_tile: int, grid_rows: int, grid_cols: int, side: int, image_size: tuple[int, int],
                       max_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """The tokens after the base view: the tiles' feature map (grid_rows*side x grid_cols*side), cropped to the
    image's aspect ratio, shrunk bilinearly when larger than max_tiles tiles allow, each row ending in the newline.
    Returns (tokens, 4) feature rows and their weights."""
    per_tile = side * side
    y, x = np.meshgrid(np.arange(grid_rows * side), np.arange(grid_cols * side), indexing="ij")
    tile = (y // side) * grid_cols + (x // side)
    source = (first_tile + 1 + tile) * per_tile + (y % side) * side + (x % side)  # (height, width)
    features = anyres_tile_features(image_size, grid_rows, grid_cols, side, max_tiles)
    source = source[features.rows, features.columns]

    current_height, current_width = source.shape
    if features.size != source.shape:
        out_height, out_width = features.size
        (y0, y1, wy), (x0, x1, wx) = _bilinear(current_height, out_height), _bilinear(current_width, out_width)
        rows = np.stack([source[y0][:, x0], source[y0][:, x1], source[y1][:, x0], source[y1][:, x1]], axis=-1)
        weights = np.stack([np.outer(1 - wy, 1 - wx), np.outer(1 - wy, wx), np.outer(wy, 1 - wx), np.outer(wy, wx)], axis=-1)
    else:
        rows = np.stack([source] + [source * 0] * 3, axis=-1)
        weights = np.zeros(source.shape + (4,))
        weights[..., 0] = 1.0
    newline_rows = np.full(rows.shape[:1] + (1, 4), -1)
    newline_weights = np.zeros(rows.shape[:1] + (1, 4))
    newline_weights[..., 0] = 1.0
    rows = np.concatenate([rows, newline_rows], axis=1).reshape(-1, 4)
    weights = np.concatenate([weights, newline_weights], axis=1).reshape(-1, 4)
    return rows, weights


def _bilinear(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch.nn.functional.interpolate(mode="bilinear", align_corners=False) along one axis: (low, high, weight)."""
    scale = size_in / size_out
    source = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0.0)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, size_in - 1)
    return low, high, (source - low).astype(np.float64)


# -- checks ----------------------------------------------------------------------------------------------------------


def _int_array(encoded: dict[str, np.ndarray], name: str, rank: int) -> np.ndarray:
    return _array(encoded, name, rank, np.integer).astype(np.int64, copy=False)


def _float_array(encoded: dict[str, np.ndarray], name: str, rank: int) -> np.ndarray:
    return _array(encoded, name, rank, np.floating).astype(np.float32, copy=False)


def _array(encoded: dict[str, np.ndarray], name: str, rank: int, kind: type) -> np.ndarray:
    if name not in encoded:
        hint = " (this bundle's prompt takes images)" if kind is np.floating else ""
        raise InputError(f"preprocessed inputs lack {name!r}{hint}")
    array = np.asarray(encoded[name])
    if array.ndim != rank or not np.issubdtype(array.dtype, kind):
        raise InputError(f"{name} must be a rank-{rank} {'integer' if kind is np.integer else 'float'} array, "
                         f"got {array.dtype} of shape {list(array.shape)}")
    return array


_PLANNERS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    TEXT: _plan_text, BERT: _plan_bert, QWEN2_VL: _plan_qwen2_vl, QWEN2_5_VL: _plan_qwen2_5_vl, QWEN3_VL: _plan_qwen3_vl,
    LLAVA: _plan_llava, GEMMA3: _plan_llava, LLAVA_ONEVISION: _plan_llava_onevision, IDEFICS3: _plan_idefics3,
}
