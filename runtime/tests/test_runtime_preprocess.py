"""The runtime's preprocessing on hand-written specs, without torch or transformers.

Equality with the builder is tested in tests/test_preprocess.py; here: spec validation, the geometry and layout the
families promise, padding, and that nothing heavy is imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from savpack_runtime.errors import InputError, PreprocessSpecError
from savpack_runtime.image_processing import anyres_max_patches, anyres_tile_features, best_resolution
from savpack_runtime.preprocess import SPEC_FILE, TOKENIZER_FILE, Preprocessor

WORDS = ["<pad>", "<s>", "<|image_pad|>", "<image>", "[UNK]", "user", "what", "is", "it", "red", "a", "circle", ":", "?"]
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def make_tokenizer(bos: bool = False) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<pad>", "<s>", "<|image_pad|>", "<image>"])
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


def pixel_steps(token: str) -> dict:
    return {"image_token": token, "image_token_id": WORDS.index(token), "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN, "image_std": STD}


def make_spec(family: str) -> dict:
    token = {"qwen2_vl": "<|image_pad|>", "llava_onevision": "<image>"}.get(family)
    image = None
    if family == "qwen2_vl":
        image = {**pixel_steps(token), "min_pixels": 56 * 56, "max_pixels": 112 * 112, "patch_size": 14,
                 "temporal_patch_size": 2, "merge_size": 2}
    elif family == "llava_onevision":
        image = {**pixel_steps(token), "size": [28, 28], "tile_size": 28,
                 "image_grid_pinpoints": [[28, 28], [28, 56], [56, 28], [56, 56]], "pad_color": [122, 116, 104],
                 "num_image_tokens": 4, "vision_feature_select_strategy": "full", "max_num_patches": 9}
    before, after = "user :", " {text} ?"
    render = {"before_images": before, "image": f" {token}" if token else "", "after_images": after,
              "max_images": None if token else 0}
    image_count = 1 if token else 0
    return {
        "format": "savpack-preprocess", "format_version": 1, "family": family,
        "prompt": {"template": "{text} ?", "rendered": before + render["image"] * image_count + after,
                   "image_count": image_count, "chat_template_sha256": None},
        "render": render,
        "text": {"add_special_tokens": family == "causal_lm", "pad_id": 0, "padding_side": "left", "max_positions": 200,
                 "mm_token_types": [[2, 1]] if family == "qwen2_vl" else None},
        "image": image,
    }


def write_bundle(folder: Path, spec: dict, tokenizer: Tokenizer) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPEC_FILE).write_text(json.dumps(spec))
    (folder / TOKENIZER_FILE).write_text(tokenizer.to_str())
    return folder


def load(family: str, tmp_path: Path) -> Preprocessor:
    return Preprocessor.load(write_bundle(tmp_path / family, make_spec(family), make_tokenizer(bos=family == "causal_lm")))


def gradient(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x % 256, y % 256, (x * y) % 256], axis=-1).astype(np.uint8))


# -- text ----------------------------------------------------------------------------------------------------------

def test_text_is_rendered_tokenised_and_left_padded(tmp_path):
    runtime = load("causal_lm", tmp_path)
    prompts = [runtime.render("what is it", 0), runtime.render("red", 0)]
    assert prompts[0] == "user : what is it ?"
    encoded = runtime.encode(prompts)
    assert list(encoded) == ["input_ids", "attention_mask"]
    assert encoded["input_ids"].dtype == np.int64 and encoded["attention_mask"].dtype == np.int64
    ids = [WORDS.index(word) for word in "<s> user : what is it ?".split()]
    assert encoded["input_ids"].tolist() == [ids, [0, 0, 1, 5, 12, 9, 13]]
    assert encoded["attention_mask"].tolist() == [[1] * 7, [0, 0, 1, 1, 1, 1, 1]]


def test_right_padding_and_the_context_limit(tmp_path):
    spec = make_spec("causal_lm")
    spec["text"].update(padding_side="right", max_positions=5)
    runtime = Preprocessor.load(write_bundle(tmp_path, spec, make_tokenizer(bos=True)))
    encoded = runtime.encode(["red", "a red circle"])
    assert encoded["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert encoded["input_ids"][0].tolist() == [1, 9, 0, 0]
    with pytest.raises(InputError, match="item 1: prompt is 6 tokens, longer than the model's context of 5"):
        runtime.encode(["red", "what is it a circle"])


def test_text_only_family_refuses_images(tmp_path):
    runtime = load("causal_lm", tmp_path)
    with pytest.raises(InputError, match="takes no images"):
        runtime.render("red", 1)
    with pytest.raises(InputError, match="text only"):
        runtime.encode(["red"], [[gradient(5, 5)]])
    with pytest.raises(InputError, match="empty"):
        runtime.encode([])


# -- images --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(20, 600), (600, 20), (10, 10), (1000, 700), (57, 113), (1, 1)])
def test_qwen2_vl_grid_respects_the_pixel_budget_and_expands_tokens(size, tmp_path):
    runtime = load("qwen2_vl", tmp_path)
    encoded = runtime.encode([runtime.render("red", 1)], [[gradient(*size)]])
    (t, grid_h, grid_w), = encoded["image_grid_thw"].tolist()
    assert t == 1 and grid_h % 2 == 0 and grid_w % 2 == 0
    # Within the pixel budget, except where the short side is already at its minimum of one merge window.
    assert 56 * 56 <= grid_h * grid_w * 14 * 14
    assert grid_h * grid_w * 14 * 14 <= 112 * 112 or min(grid_h, grid_w) == 2
    assert encoded["pixel_values"].shape == (grid_h * grid_w, 3 * 2 * 14 * 14)
    assert encoded["pixel_values"].dtype == np.float32
    image_tokens = encoded["input_ids"] == 2
    assert image_tokens.sum() == grid_h * grid_w // 4
    assert np.array_equal(encoded["mm_token_type_ids"], image_tokens.astype(np.int64))


def test_qwen2_vl_patches_are_ordered_by_merge_window(tmp_path):
    spec = make_spec("qwen2_vl")
    spec["image"].update(do_rescale=False, do_normalize=False)
    runtime = Preprocessor.load(write_bundle(tmp_path, spec, make_tokenizer()))
    # 56x56 needs no resize: 4x4 patches, patch (row, col) filled with 10*row + col.
    values = np.kron(np.add.outer(10 * np.arange(4), np.arange(4)), np.ones((14, 14))).astype(np.uint8)
    image = Image.fromarray(np.stack([values] * 3, axis=-1))
    pixels = runtime.encode([runtime.render("red", 1)], [[image]])["pixel_values"]
    assert pixels[:, 0].tolist() == [0, 1, 10, 11, 2, 3, 12, 13, 20, 21, 30, 31, 22, 23, 32, 33]
    assert np.all(pixels == pixels[:, :1])  # each row holds its own patch only (3 channels x 2 times x 14 x 14)


def test_qwen2_vl_refuses_extreme_aspect_ratios(tmp_path):
    runtime = load("qwen2_vl", tmp_path)
    with pytest.raises(InputError, match=r"image 0 \(1x201\): aspect ratio 201"):
        runtime.encode([runtime.render("red", 1)], [[gradient(1, 201)]])


def test_llava_onevision_single_image_is_tiled_and_several_are_squared(tmp_path):
    runtime = load("llava_onevision", tmp_path)
    wide, tall = gradient(50, 20), gradient(20, 50)
    single = runtime.encode([runtime.render("red", 1)], [[wide]])
    # 50x20 fits best into 28 high x 56 wide: the base view and 2 tiles.
    assert best_resolution((20, 50), ((28, 28), (28, 56), (56, 28), (56, 56))) == (28, 56)
    assert single["pixel_values"].shape == (1, 3, 3, 28, 28)
    assert single["image_sizes"].tolist() == [[20, 50]] and single["batch_num_images"].tolist() == [1]

    several = runtime.encode([runtime.render("red", 2), runtime.render("a", 1)], [[wide, tall], [tall]])
    assert several["batch_num_images"].tolist() == [2, 1]
    assert several["pixel_values"].shape == (3, 3, 3, 28, 28)  # views padded to the most any image has
    assert np.all(several["pixel_values"][:2, 1:] == 0)  # one view each for the images of a multi-image item
    # Squares are padded with the mean colour, which normalises to ~0 (mean/255 truncated to 8 bits).
    padding = several["pixel_values"][0, 0, :, 0, 0]
    assert np.all(np.abs(padding) < 0.02)
    tokens = (several["input_ids"] == 3).sum(axis=1)
    assert tokens[0] == 2 * (4 + 1)


@pytest.mark.parametrize("value, expected", [("anyres_max_9", 9), ("anyres_max_16", 16)])
def test_anyres_max_is_parsed_in_one_place(value, expected):
    assert anyres_max_patches(value) == expected


@pytest.mark.parametrize("value", ["anyres", "anyres_max_", "anyres_max_0", "anyres_max_x9", "max_9", "anyres_max_-1"])
def test_malformed_anyres_max_is_refused_by_name(value):
    with pytest.raises(ValueError, match=f"vision_aspect_ratio '{value}' is not anyres_max_N"):
        anyres_max_patches(value)


def test_anyres_crop_and_shrink_are_the_token_count_and_the_gather():
    """The token count (image_processing) and the graph's gather (graph_inputs) use one arithmetic: a wide image
    crops rows, a tall one columns, and a map beyond max_num_patches tiles shrinks."""
    wide = anyres_tile_features((100, 400), 1, 2, 4, 9)  # a 4 x 8 map holding a 1:4 picture: 2 rows kept
    assert (wide.rows, wide.columns, wide.size) == (slice(1, 3), slice(0, 8), (2, 8))
    tall = anyres_tile_features((400, 100), 2, 1, 4, 9)
    assert (tall.rows, tall.columns, tall.size) == (slice(0, 8), slice(1, 3), (8, 2))
    shrunk = anyres_tile_features((300, 300), 3, 3, 4, 1)  # 12 x 12 features, 1 tile allowed: ratio 3
    assert shrunk.size == (4, 4)


def test_placeholders_must_match_the_images(tmp_path):
    runtime = load("llava_onevision", tmp_path)
    with pytest.raises(InputError, match="item 0: the prompt holds 1 image placeholder"):
        runtime.encode([runtime.render("red", 1)], [[gradient(9, 9), gradient(9, 9)]])
    with pytest.raises(InputError, match="mixes items"):
        runtime.encode([runtime.render("red", 1), runtime.render("red", 0)], [[gradient(9, 9)], []])
    with pytest.raises(InputError, match="holds 1 image placeholder"):
        runtime.encode(["<image> typed by a user"])
    with pytest.raises(InputError, match="item 0: images must be PIL images"):
        runtime.encode([runtime.render("red", 1)], [[np.zeros((9, 9, 3), np.uint8)]])


# -- the spec ------------------------------------------------------------------------------------------------------

def _set(path: str, value):
    def change(spec: dict) -> None:
        *parents, last = path.split(".")
        target = spec
        for key in parents:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return change


def _token_outside_the_image_block(spec: dict) -> None:
    render = spec["render"]
    render["before_images"] += " <|image_pad|>"
    spec["prompt"]["rendered"] = render["before_images"] + render["image"] + render["after_images"]


@pytest.mark.parametrize("change, message", [
    (_set("format", "other"), "format is 'other'"),
    (_set("format_version", 3), "format_version 3 is newer"),
    (_set("family", "gpt9"), "family 'gpt9'"),
    (_set("text", KeyError), "required field 'text'"),
    (_set("text.pad_id", "0"), r"text.pad_id: expected int"),
    (_set("text.padding_side", "middle"), r"text.padding_side: must be 'left' or 'right'"),
    (_set("text.pad_id", 999), "pad_id 999 is outside"),
    (_set("image.surprise", 1), r"image: unknown \['surprise'\]"),
    (_set("image.merge_size", KeyError), r"image: missing \['merge_size'\]"),
    (_set("image.image_std", [1, 0, 1]), r"image.image_std: must hold 3 non-zero values"),
    (_set("image.image_mean", [0.5, 0.5]), r"image.image_mean: must hold 3 values"),
    (_set("image.image_token_id", 3), r"image_token '<\|image_pad\|>' is id 2"),
    (_set("image.max_pixels", 10), r"image.max_pixels: must be >= min_pixels"),
    (_set("image", None), "image must be an object"),
    (_set("render.after_images", " changed"), "render does not reproduce prompt.rendered"),
    (_set("render.image", " <|image_pad|> <|image_pad|>"), "render does not reproduce prompt.rendered"),
    (_token_outside_the_image_block, r"image token '<\|image_pad\|>' must stand once in render.image"),
    (_set("prompt", {"template": "x"}), "prompt must be an object with fields"),
])
def test_invalid_specs_are_refused_naming_the_field(change, message, tmp_path):
    spec = make_spec("qwen2_vl")
    change(spec)
    with pytest.raises(PreprocessSpecError, match=message):
        Preprocessor.load(write_bundle(tmp_path, spec, make_tokenizer()))


def test_unreadable_files_are_refused_naming_the_file(tmp_path):
    with pytest.raises(PreprocessSpecError, match="preprocess.json: file does not exist"):
        Preprocessor.load(tmp_path)
    folder = write_bundle(tmp_path / "bundle", make_spec("qwen2_vl"), make_tokenizer())
    (folder / TOKENIZER_FILE).write_text("{not a tokenizer")
    with pytest.raises(PreprocessSpecError, match="tokenizer.json: not a tokenizer file"):
        Preprocessor.load(folder)
    (folder / SPEC_FILE).write_text("[1, 2")
    with pytest.raises(PreprocessSpecError, match="preprocess.json: not valid JSON"):
        Preprocessor.load(folder)


@pytest.mark.slow
def test_preprocessing_imports_neither_torch_nor_transformers(tmp_path):
    folder = write_bundle(tmp_path / "bundle", make_spec("llava_onevision"), make_tokenizer())
    script = (
        "import sys\nfrom PIL import Image\nfrom savpack_runtime.preprocess import Preprocessor\n"
        f"runtime = Preprocessor.load({str(folder)!r})\n"
        "runtime.encode([runtime.render('red', 1)], [[Image.new('RGB', (30, 20))]])\n"
        "print(sorted(name for name in ('torch', 'transformers', 'onnx') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
