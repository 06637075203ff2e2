"""Image preprocessing in numpy and PIL, equal to the Hugging Face image processors' PIL backend (transformers 5.24).

Each family's class reproduces its transformers counterpart step by step: the same PIL resize of the 8-bit RGB
picture, the same float64 rescale cast to float32, the same float32 normalisation, the same patch layout. The values
are therefore the same bits, not only close. The fields are the preprocessing spec's `image` section
(docs/preprocessing.md); the builder writes them from the model's processor, the runtime reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import InputError

PIL_RESAMPLING = (0, 1, 2, 3, 4, 5)  # nearest, lanczos, bilinear, bicubic, box, hamming: PIL's own numbers


@dataclass(frozen=True)
class PixelSteps:
    """What every family does to pixels, and how its images appear in the prompt."""

    image_token: str  # the placeholder the rendered prompt holds once per image
    image_token_id: int
    resample: int  # PIL resampling filter number
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    def __post_init__(self) -> None:
        _require(self.resample in PIL_RESAMPLING, "resample", f"must be a PIL filter number {PIL_RESAMPLING}")
        _require(len(self.image_mean) == 3, "image_mean", "must hold 3 values (R, G, B)")
        _require(len(self.image_std) == 3 and all(s != 0 for s in self.image_std), "image_std", "must hold 3 non-zero values")

    def resize(self, pixels: Image.Image | np.ndarray, height: int, width: int) -> np.ndarray:
        """(H, W, 3) uint8 -> (height, width, 3) uint8 with PIL, as transformers' resize does."""
        image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
        return np.asarray(image.resize((width, height), resample=self.resample))

    @property
    def feature_token(self) -> tuple[str, int]:
        """The token that receives image features (string, id); most families' placeholder itself."""
        return self.image_token, self.image_token_id

    def expansion(self, tokens: int) -> str:
        """What an image's placeholder becomes in the prompt, for an image of `tokens` features."""
        return self.image_token * tokens

    def to_float(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (3, H, W) float32: rescaled in float64 then cast, normalised in float32."""
        values = pixels.astype(np.float64) * self.rescale_factor if self.do_rescale else pixels
        values = values.astype(np.float32)
        if self.do_normalize:
            values = (values - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        return values.transpose(2, 0, 1)


@dataclass(frozen=True)
class Qwen2VLImages(PixelSteps):
    """Qwen2VLImageProcessorPil: resize so both sides are multiples of patch*merge within [min, max] pixels, cut into
    patches; each image becomes grid_h*grid_w patch rows and grid_h*grid_w/merge^2 tokens."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int

    MAX_ASPECT_RATIO = 200  # transformers' smart_resize refuses more

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels"):
            _require(getattr(self, name) > 0, name, "must be positive")
        _require(self.max_pixels >= self.min_pixels, "max_pixels", f"must be >= min_pixels ({self.min_pixels})")

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """transformers' smart_resize, operation for operation (its float rounding decides the grid)."""
        factor = self.patch_size * self.merge_size
        h_bar = round(height / factor) * factor
        w_bar = round(width / factor) * factor
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt((height * width) / self.max_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        return h_bar, w_bar

    def process(self, images: list[list[Image.Image]]) -> tuple[dict[str, np.ndarray], list[str]]:
        """RGB images per item -> ({pixel_values (patches, 3*T*P*P) float32, image_grid_thw (n, 3) int64},
        each image's placeholder text in order)."""
        patches, grids = [], []
        for index, image in enumerate(image for item in images for image in item):
            width, height = image.size
            if max(height, width) / min(height, width) > self.MAX_ASPECT_RATIO:
                raise InputError(
                    f"image {index} ({width}x{height}): aspect ratio {max(height, width) / min(height, width):.0f} is "
                    f"above the {self.MAX_ASPECT_RATIO} that Qwen2-VL accepts; crop it first"
                )
            resized = self.resize(image, *self.resized_size(height, width))
            rows, grid_h, grid_w = self._patchify(self.to_float(resized))
            patches.append(rows)
            grids.append([1, grid_h, grid_w])
        grid_thw = np.array(grids, dtype=np.int64).reshape(-1, 3)
        tokens = [int(grid.prod()) // self.merge_size**2 for grid in grid_thw]
        return {"pixel_values": np.concatenate(patches, axis=0), "image_grid_thw": grid_thw}, [self.expansion(n) for n in tokens]

    def _patchify(self, image: np.ndarray) -> tuple[np.ndarray, int, int]:
        """(C, H, W) -> (grid_h*grid_w, C*T*P*P): merge windows together, each patch repeated T times in time."""
        channels, height, width = image.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = height // p, width // p
        blocks = image.reshape(channels, grid_h // m, m, p, grid_w // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        blocks = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))  # (gh/m, gw/m, m, m, C, T, P, P)
        return blocks.reshape(grid_h * grid_w, channels * t * p * p), grid_h, grid_w


@dataclass(frozen=True)
class LlavaOnevisionImages(PixelSteps):
    """LlavaOnevisionImageProcessorPil + LlavaOnevisionProcessor's token count.

    An item with one image is seen "anyres": a base view of the whole image plus the tiles of the image resized into
    the best-fitting pinpoint resolution. Items with several images see each padded to a square, one view each.
    """

    size: tuple[int, int]  # (height, width) of every view
    tile_size: int  # side of the tiles cut from the pinpoint resolution
    image_grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width) resolutions
    pad_color: tuple[int, int, int]  # background of multi-image squares (the image mean, as 8-bit values)
    num_image_tokens: int  # features of one view
    vision_feature_select_strategy: str  # "default" drops one feature (CLS), "full" keeps all
    max_num_patches: int  # from vision_aspect_ratio "anyres_max_N"

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(min(self.size) > 0 and self.tile_size > 0, "size", "must be positive")
        _require(len(self.image_grid_pinpoints) > 0, "image_grid_pinpoints", "must not be empty")
        _require(self.vision_feature_select_strategy in ("default", "full"), "vision_feature_select_strategy",
                 "must be 'default' or 'full'")
        _require(self.num_image_tokens > 0 and self.max_num_patches > 0, "num_image_tokens", "must be positive")

    def process(self, images: list[list[Image.Image]]) -> tuple[dict[str, np.ndarray], list[str]]:
        """RGB images per item -> ({pixel_values (n, views, 3, H, W) float32, image_sizes (n, 2) int64,
        batch_num_images (items,) int64}, each image's placeholder text in order)."""
        views, sizes, tokens = [], [], []
        for item in images:
            for image in item:
                width, height = image.size
                if len(item) == 1:
                    pictures = self._anyres_views(image)
                    count = self._anyres_tokens(height, width)
                else:
                    pictures = [pad_to_square(np.asarray(image), self.pad_color)]
                    count = self.num_image_tokens + 1  # + the image newline
                views.append(np.stack([self.to_float(self.resize(picture, *self.size)) for picture in pictures]))
                sizes.append([height, width])
                tokens.append(count - 1 if self.vision_feature_select_strategy == "default" else count)
        most = max(len(stack) for stack in views)
        padded = [np.pad(stack, ((0, most - len(stack)), (0, 0), (0, 0), (0, 0))) for stack in views]
        inputs = {
            "pixel_values": np.stack(padded),
            "image_sizes": np.array(sizes, dtype=np.int64),
            "batch_num_images": np.array([len(item) for item in images], dtype=np.int64),
        }
        return inputs, [self.expansion(n) for n in tokens]

    def _anyres_views(self, image: Image.Image) -> list[np.ndarray]:
        """The whole image at `size`, then the tiles of it fitted (aspect kept, centred on black) into the best
        pinpoint resolution, row by row. Each (h, w, 3) uint8."""
        width, height = image.size
        best = best_resolution((height, width), self.image_grid_pinpoints)
        fitted = self.resize(image, *fitted_size(height, width, best))
        # transformers measures the fitted image again before centring it; so does this.
        new_height, new_width = fitted_size(fitted.shape[0], fitted.shape[1], best)
        top, extra_y = divmod(best[0] - new_height, 2)
        left, extra_x = divmod(best[1] - new_width, 2)
        canvas = np.pad(fitted, ((top, top + extra_y), (left, left + extra_x), (0, 0)))
        tile = self.tile_size
        tiles = [canvas[y : y + tile, x : x + tile] for y in range(0, canvas.shape[0], tile)
                 for x in range(0, canvas.shape[1], tile)]
        return [self.resize(image, *self.size)] + tiles

    def _anyres_tokens(self, height: int, width: int) -> int:
        """LlavaOnevisionProcessor._get_number_of_features: base view + unpadded tiles + one newline per row."""
        best_height, best_width = best_resolution((height, width), self.image_grid_pinpoints)
        side = math.isqrt(self.num_image_tokens)
        tiles = anyres_tile_features((height, width), best_height // self.size[0], best_width // self.size[1], side,
                                     self.max_num_patches)
        rows, columns = tiles.size
        return rows * (columns + 1) + self.num_image_tokens


@dataclass(frozen=True)
class LlavaImages(PixelSteps):
    """LLaVA-1.5's image processor (CLIPImageProcessorPil, or LlavaImageProcessorPil with its pad-to-square) and
    LlavaProcessor's token count: optionally pad to a square, resize (the shortest edge to `shortest_edge`, the other
    side by the same factor, truncated; or to exactly `size`), center crop to `crop_size`. Every image ends at one
    fixed size and gives `num_image_tokens` tokens."""

    pad_to_square: bool  # LlavaImageProcessor's do_pad: pad to a square of pad_color before resizing
    pad_color: tuple[int, int, int]
    shortest_edge: int | None  # resize the shorter side to this (transformers' default_to_square=False) ...
    size: tuple[int, int] | None  # ... or to exactly (height, width): one of the two
    crop_size: tuple[int, int] | None  # center crop (height, width) after resizing; None: no crop
    num_image_tokens: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _require((self.shortest_edge is None) != (self.size is None), "size", "give exactly one of shortest_edge and size")
        _require(self.shortest_edge is None or self.crop_size is not None, "crop_size",
                 "is needed with shortest_edge (images must end at one size)")
        for name in ("shortest_edge", "size", "crop_size"):
            value = getattr(self, name)
            _require(value is None or min(np.atleast_1d(value)) > 0, name, "must be positive")
        _require(self.num_image_tokens > 0, "num_image_tokens", "must be positive")

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """transformers' get_resize_output_image_size(default_to_square=False) for shortest_edge, else size."""
        if self.size is not None:
            return self.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def process(self, images: list[list[Image.Image]]) -> tuple[dict[str, np.ndarray], list[str]]:
        """RGB images per item -> ({pixel_values (n, 3, H, W) float32}, each image's placeholder text in order)."""
        views = []
        for image in (image for item in images for image in item):
            pixels = np.asarray(image)
            if self.pad_to_square:
                pixels = pad_to_square(pixels, self.pad_color)
            pixels = self.resize(pixels, *self.resized_size(*pixels.shape[:2]))
            if self.crop_size is not None:
                pixels = center_crop(pixels, *self.crop_size)
            views.append(self.to_float(pixels))
        return {"pixel_values": np.stack(views)}, [self.expansion(self.num_image_tokens)] * len(views)


@dataclass(frozen=True)
class Gemma3Images(PixelSteps):
    """Gemma3ImageProcessorPil (without pan-and-scan) + Gemma3Processor's prompt: every image resized to one `size`;
    its placeholder (the begin-of-image token) becomes `\n\n<boi>` + `soft_token` x image_seq_length + `<eoi>\n\n`,
    and the soft tokens receive the image's features."""

    size: tuple[int, int]  # (height, width)
    image_seq_length: int
    soft_token: str
    soft_token_id: int
    end_token: str  # the end-of-image token

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(min(self.size) > 0, "size", "must be positive")
        _require(self.image_seq_length > 0, "image_seq_length", "must be positive")

    @property
    def feature_token(self) -> tuple[str, int]:
        return self.soft_token, self.soft_token_id

    def expansion(self, tokens: int) -> str:
        return f"\n\n{self.image_token}{self.soft_token * tokens}{self.end_token}\n\n"

    def process(self, images: list[list[Image.Image]]) -> tuple[dict[str, np.ndarray], list[str]]:
        """RGB images per item -> ({pixel_values (n, 3, H, W) float32}, each image's placeholder text in order)."""
        views = [self.to_float(self.resize(image, *self.size)) for item in images for image in item]
        return {"pixel_values": np.stack(views)}, [self.expansion(self.image_seq_length)] * len(views)


@dataclass(frozen=True)
class Idefics3Images(PixelSteps):
    """Idefics3ImageProcessorPil / SmolVLMImageProcessorPil and their processors' prompt strings.

    An image is resized so its longest edge is `longest_edge` (the shorter side rounded up to even), then (with
    splitting) up to multiples of `frame_size` and cut into frame_size x frame_size tiles, row by row, followed by
    the whole image resized to one frame; without splitting it becomes one frame. Every resize is PIL's, on the 8-bit
    picture, as transformers does. Each frame gives `image_seq_len` image tokens, written with the `<row_r_col_c>`,
    `fake_token` and `global_token` markers."""

    longest_edge: int | None  # None: the first resize is skipped (do_resize with a height/width size is refused)
    frame_size: int  # max_image_size["longest_edge"]
    do_image_splitting: bool
    image_seq_len: int
    fake_token: str
    global_token: str

    MAX_IMAGE_SIZE = 4096  # transformers caps the first resize at 4k

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.frame_size > 0, "frame_size", "must be positive")
        _require(self.longest_edge is None or self.longest_edge > 0, "longest_edge", "must be positive")
        _require(self.image_seq_len > 0, "image_seq_len", "must be positive")

    def first_size(self, height: int, width: int) -> tuple[int, int]:
        """_resize_output_size_rescale_to_max_len then _resize_output_size_scale_below_upper_bound."""
        aspect = width / height
        if width >= height:
            width = self.longest_edge
            height = int(width / aspect)
            height += height % 2
        else:
            height = self.longest_edge
            width = int(height * aspect)
            width += width % 2
        height, width = max(height, 1), max(width, 1)
        aspect = width / height
        if width >= height and width > self.MAX_IMAGE_SIZE:
            width, height = self.MAX_IMAGE_SIZE, int(self.MAX_IMAGE_SIZE / aspect)
        elif height > width and height > self.MAX_IMAGE_SIZE:
            height, width = self.MAX_IMAGE_SIZE, int(self.MAX_IMAGE_SIZE * aspect)
        return max(height, 1), max(width, 1)

    def split_size(self, height: int, width: int) -> tuple[int, int]:
        """resize_for_vision_encoder: both sides up to multiples of frame_size, aspect kept as transformers keeps it."""
        frame, aspect = self.frame_size, width / height
        if width >= height:
            width = math.ceil(width / frame) * frame
            height = math.ceil(int(width / aspect) / frame) * frame
        else:
            height = math.ceil(height / frame) * frame
            width = math.ceil(int(height * aspect) / frame) * frame
        return height, width

    def frames(self, image: Image.Image) -> tuple[list[np.ndarray], int, int]:
        """One image -> its frames (each (frame, frame, 3) uint8), tile rows and tile columns (0, 0: not split)."""
        pixels = np.asarray(image)
        if self.longest_edge is not None:
            pixels = self.resize(pixels, *self.first_size(*pixels.shape[:2]))
        frame = self.frame_size
        if not self.do_image_splitting:
            return [self.resize(pixels, frame, frame)], 0, 0
        pixels = self.resize(pixels, *self.split_size(*pixels.shape[:2]))
        height, width = pixels.shape[:2]
        if height <= frame and width <= frame:
            return [pixels], 0, 0
        rows, cols = (height - frame) // frame + 1, (width - frame) // frame + 1
        tiles = [pixels[r * frame : (r + 1) * frame, c * frame : (c + 1) * frame] for r in range(rows) for c in range(cols)]
        return tiles + [self.resize(pixels, frame, frame)], rows, cols

    def prompt(self, rows: int, cols: int) -> str:
        """The processor's replacement text for one image of rows x cols tiles (0 x 0: one frame)."""
        tokens = self.image_token * self.image_seq_len
        whole = f"{self.fake_token}{self.global_token}{tokens}{self.fake_token}"
        if rows == 0 and cols == 0:
            return whole
        text = "".join("".join(f"{self.fake_token}<row_{r + 1}_col_{c + 1}>{tokens}" for c in range(cols)) + "\n"
                       for r in range(rows))
        return text + "\n" + whole

    def process(self, images: list[list[Image.Image]]) -> tuple[dict[str, np.ndarray], list[str]]:
        """RGB images per item -> ({pixel_values (items, most frames, 3, F, F) float32, pixel_attention_mask
        (items, most frames, F, F) int64: 1 on real frames}, each image's placeholder text in order)."""
        per_item, texts = [], []
        for item in images:
            frames = []
            for image in item:
                cut, rows, cols = self.frames(image)
                frames += [self.to_float(frame) for frame in cut]
                texts.append(self.prompt(rows, cols))
            per_item.append(frames)
        most, frame = max(len(frames) for frames in per_item), self.frame_size
        pixel_values = np.zeros((len(per_item), most, 3, frame, frame), dtype=np.float32)
        pixel_mask = np.zeros((len(per_item), most, frame, frame), dtype=np.int64)
        for index, frames in enumerate(per_item):
            pixel_values[index, : len(frames)] = frames
            pixel_mask[index, : len(frames)] = 1
        return {"pixel_values": pixel_values, "pixel_attention_mask": pixel_mask}, texts


def pad_to_square(pixels: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """(h, w, 3) uint8 centred on a square of `color` (transformers' pad_to_square; the odd pixel goes after)."""
    height, width = pixels.shape[:2]
    if height == width:
        return pixels
    side = max(height, width)
    square = np.empty((side, side, 3), dtype=pixels.dtype)
    square[:] = color
    if width > height:
        start = (side - height) // 2
        square[start : start + height] = pixels
    else:
        start = (side - width) // 2
        square[:, start : start + width] = pixels
    return square


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center_crop on (h, w, 3): the centred (height, width) window; an image smaller than it is first
    centred on black, as transformers pads it."""
    original_height, original_width = pixels.shape[:2]
    top, left = (original_height - height) // 2, (original_width - width) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + height, left : left + width]
    padded_height, padded_width = max(height, original_height), max(width, original_width)
    canvas = np.zeros((padded_height, padded_width) + pixels.shape[2:], dtype=pixels.dtype)
    top_pad, left_pad = math.ceil((padded_height - original_height) / 2), math.ceil((padded_width - original_width) / 2)
    canvas[top_pad : top_pad + original_height, left_pad : left_pad + original_width] = pixels
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top) : min(padded_height, top + height), max(0, left) : min(padded_width, left + width)]


def best_resolution(size: tuple[int, int], resolutions: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """transformers' select_best_resolution: most of the image kept, then least area wasted. (height, width)."""
    height, width = size
    best, most_kept, least_wasted = resolutions[0], 0, float("inf")
    for res_height, res_width in resolutions:
        scale = min(res_width / width, res_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = res_width * res_height - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (res_height, res_width), kept, wasted
    return best


@dataclass(frozen=True)
class AnyresFeatures:
    """Where LLaVA-OneVision's tile features land: the crop of the tiles' feature map that holds the image, and the
    size that crop is shrunk to (bilinearly) when it exceeds what `max_num_patches` tiles allow."""

    rows: slice  # of the (grid_rows * side, grid_columns * side) tile feature map
    columns: slice
    size: tuple[int, int]  # (rows, columns) after the shrink; the crop's own size when there is none


def anyres_tile_features(image_size: tuple[int, int], grid_rows: int, grid_columns: int, side: int,
                         max_num_patches: int) -> AnyresFeatures:
    """transformers' unpad_image and pack_image_features' downsizing for one image of `image_size` (height, width)
    whose tiles form a grid_rows x grid_columns grid of side x side features each. Shared by the token count (here)
    and the graph's feature gather (graph_inputs), so both cut and shrink the same way."""
    height, width = grid_rows * side, grid_columns * side
    original_height, original_width = image_size
    rows, columns = slice(0, height), slice(0, width)
    if original_width / original_height > width / height:
        new_height = int(round(original_height * (width / original_width), 7))
        pad = (height - new_height) // 2
        rows = slice(pad, height - pad)
    else:
        new_width = int(round(original_width * (height / original_height), 7))
        pad = (width - new_width) // 2
        columns = slice(pad, width - pad)
    current_height, current_width = rows.stop - rows.start, columns.stop - columns.start
    ratio = math.sqrt(current_height * current_width / (max_num_patches * side**2))
    if ratio > 1.1:
        return AnyresFeatures(rows, columns, (int(current_height // ratio), int(current_width // ratio)))
    return AnyresFeatures(rows, columns, (current_height, current_width))


def anyres_max_patches(vision_aspect_ratio: str) -> int:
    """"anyres_max_9" -> 9: the most tiles LLaVA-OneVision's feature map keeps before shrinking."""
    prefix = "anyres_max_"
    number = str(vision_aspect_ratio).removeprefix(prefix)
    if not (str(vision_aspect_ratio).startswith(prefix) and number.isascii() and number.isdigit() and int(number) > 0):
        raise ValueError(f"vision_aspect_ratio {vision_aspect_ratio!r} is not {prefix}N with N >= 1")
    return int(number)


def fitted_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """transformers' get_patch_output_size: the (height, width) of an image scaled to fit `target`, aspect kept."""
    target_height, target_width = target
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field}: {message}")
