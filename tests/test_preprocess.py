"""The runtime's preprocessing (numpy, PIL, tokenizers) against the builder's (transformers processors, PIL backend).

Every comparison goes through `input_differences`: same input names, dtypes and shapes, token ids identical, pixel
values within 1e-5. Images are written to files and read back with load_image, as the builder and the runtime read them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from savpack.errors import ExportError
from savpack.pipeline import prompt_metadata
from savpack.preprocess_spec import builder_inputs, input_differences, probe_image, write_preprocessing
from savpack_runtime.errors import InputError, OutputPathError
from savpack_runtime.images import load_image
from savpack_runtime.preprocess import SPEC_FILE, TOKENIZER_FILE, Preprocessor

TEMPLATE = "Question: {text} Answer:"
TEXTS = ["what colour is it", "", "a much longer question about the big red circle on the left of the picture", "two\nlines 🙂"]
# (width, height): square, odd, extreme aspect ratios both ways, tiny, large.
SIZES = [(20, 600), (600, 20), (10, 10), (1000, 700), (57, 113), (300, 299), (1, 1)]
MODES = ["RGBA", "L", "LA", "P", "P-transparent", "CMYK", "I;16", "RGB-keyed"]
IMAGE_FAMILIES = ["qwen2_vl", "llava_onevision", "qwen2_5_vl", "llava", "gemma3", "idefics3", "smolvlm", "qwen3_vl"]
# Chat templates that render a turn without images otherwise than n = 0 images: text-only items are refused by the
# runtime's spec for an image prompt (the builder renders them, but an image bundle never takes them).
IMAGES_REQUIRED = ("idefics3", "smolvlm")


def spec_folder(loaded, tmp_path: Path) -> Path:
    image_count = 1 if loaded.family.takes_images else 0
    write_preprocessing(loaded, prompt_metadata(loaded, TEMPLATE, image_count), tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def preprocessor(loaded_model, tmp_path_factory):
    """preprocessor(name) -> the runtime Preprocessor loaded from the spec written for fixture `name`."""
    cache = {}

    def get(name: str) -> Preprocessor:
        if name not in cache:
            cache[name] = Preprocessor.load(spec_folder(loaded_model(name), tmp_path_factory.mktemp(f"spec-{name}")))
        return cache[name]

    return get


def assert_same_inputs(loaded, runtime: Preprocessor, texts: list[str], images: list[list[Image.Image]]) -> None:
    prompts = [loaded.render(TEMPLATE, text, len(item)) for text, item in zip(texts, images)]
    assert [runtime.render(text, len(item)) for text, item in zip(texts, images)] == prompts
    expected = builder_inputs(loaded, prompts, images)
    assert input_differences(expected, runtime.encode(prompts, images)) == []


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    return probe_image(width, height, seed)


def saved(image: Image.Image, folder: Path, name: str, **options) -> Path:
    path = folder / name
    image.save(path, **options)
    return path


def image_in_mode(mode: str, folder: Path) -> Path:
    """A 45x31 picture stored in `mode`, with real transparency where the mode has it."""
    rgb = picture(45, 31, seed=3)
    alpha = Image.fromarray((np.arange(45 * 31).reshape(31, 45) * 7 % 256).astype(np.uint8))
    if mode == "RGBA":
        return saved(Image.merge("RGBA", (*rgb.split(), alpha)), folder, "rgba.png")
    if mode == "LA":
        return saved(Image.merge("LA", (rgb.convert("L"), alpha)), folder, "la.png")
    if mode == "P-transparent":
        palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        return saved(palette, folder, "pt.png", transparency=int(np.asarray(palette)[0, 0]))
    if mode == "RGB-keyed":  # an RGB PNG whose key colour is transparent (tRNS chunk)
        keyed = np.asarray(rgb).copy()
        keyed[:10] = (10, 20, 30)
        return saved(Image.fromarray(keyed), folder, "keyed.png", transparency=(10, 20, 30))
    if mode == "CMYK":
        return saved(rgb.convert("CMYK"), folder, "cmyk.tiff")
    if mode == "I;16":
        wide = (np.asarray(rgb.convert("L")).astype(np.uint16) * 257).astype(np.uint16)
        return saved(Image.fromarray(wide), folder, "grey16.png")
    return saved(rgb.convert(mode), folder, f"{mode.lower()}.png")


def image_with_orientation(orientation: int, folder: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return saved(picture(40, 90, seed=orientation), folder, f"orientation{orientation}.jpg", exif=exif, quality=95)


# -- images: sizes, modes, orientations, batches ---------------------------------------------------------------------

@pytest.mark.parametrize("name", IMAGE_FAMILIES)
def test_image_sizes_match_the_builder(name, loaded_model, preprocessor, tmp_path):
    loaded, runtime = loaded_model(name), preprocessor(name)
    for width, height in SIZES:
        path = saved(picture(width, height, seed=width), tmp_path, f"{width}x{height}.png")
        assert_same_inputs(loaded, runtime, ["what is it"], [[load_image(path)]])


@pytest.mark.parametrize("name", IMAGE_FAMILIES)
def test_image_modes_and_orientations_match_the_builder(name, loaded_model, preprocessor, tmp_path):
    loaded, runtime = loaded_model(name), preprocessor(name)
    paths = [image_in_mode(mode, tmp_path) for mode in MODES]
    paths += [image_with_orientation(orientation, tmp_path) for orientation in range(1, 9)]
    for path in paths:
        assert_same_inputs(loaded, runtime, ["what is it"], [[load_image(path)]])
    # The orientation really is applied: orientations 5-8 turn the 40x90 picture to 90x40.
    assert load_image(tmp_path / "orientation6.jpg").size == (90, 40)


@pytest.mark.parametrize("name", IMAGE_FAMILIES)
def test_mixed_batches_match_the_builder(name, loaded_model, preprocessor):
    loaded, runtime = loaded_model(name), preprocessor(name)
    one_each = [[picture(60, 90, 1)], [picture(200, 50, 2)], [picture(10, 10, 3)], [picture(500, 480, 4)]]
    assert_same_inputs(loaded, runtime, TEXTS, one_each)
    # Several images per item (LLaVA-OneVision pads each to a square), mixed with single-image items.
    several = [[picture(60, 90, 5), picture(120, 40, 6)], [picture(33, 33, 7)], [picture(80, 20, 8)] * 3]
    assert_same_inputs(loaded, runtime, TEXTS[:3], several)
    if name in IMAGES_REQUIRED:
        with pytest.raises(InputError, match="at least 1 image"):
            runtime.render("a", 0)
    else:
        assert_same_inputs(loaded, runtime, TEXTS, [[], [], [], []])  # text only, in an image-text family


@pytest.mark.parametrize("name", ["qwen2", "llama", "gemma3_text", "qwen3", "gemma", "gemma2", "gpt2", "bert"])
def test_text_only_families_match_the_builder(name, loaded_model, preprocessor):
    loaded, runtime = loaded_model(name), preprocessor(name)
    assert_same_inputs(loaded, runtime, TEXTS, [[] for _ in TEXTS])
    assert_same_inputs(loaded, runtime, ["colour"], [[]])
    with pytest.raises(InputError, match="no images"):
        runtime.render("a", 1)
    with pytest.raises(InputError, match="text only"):
        runtime.encode(["a"], [[picture(20, 20)]])


def test_llama_prompt_starts_with_bos_and_qwen2_chat_prompt_does_not(loaded_model, preprocessor):
    llama = preprocessor("llama").encode(["red"])
    assert llama["input_ids"][0, 0] == loaded_model("llama").tokenizer.bos_token_id
    qwen = preprocessor("qwen2").encode([preprocessor("qwen2").render("red", 0)])
    assert qwen["input_ids"][0, 0] == loaded_model("qwen2").tokenizer.convert_tokens_to_ids("<|im_start|>")


@pytest.mark.parametrize("name", IMAGE_FAMILIES)
def test_rendering_any_image_count_matches_the_builder(name, loaded_model, preprocessor):
    loaded, runtime = loaded_model(name), preprocessor(name)
    for count in range(1 if name in IMAGES_REQUIRED else 0, 7):
        for text in TEXTS + ["{text} inside", "  "]:
            assert runtime.render(text, count) == loaded.render(TEMPLATE, text, count)


# -- real-size image processor configurations ----------------------------------------------------------------------

def with_image_processor(loaded, image_processor, **processor_fields):
    """The fixture model with another image processor: encode() and the spec then follow the real configuration."""
    processor = copy.copy(loaded.processor)
    processor.image_processor = image_processor
    for key, value in processor_fields.items():
        setattr(processor, key, value)
    # The real models' contexts (32k) hold what their processors make; the fixture's 1024 would not.
    return dataclasses.replace(loaded, processor=processor, max_positions=None)


def test_qwen2_vl_2b_image_processor_at_real_size(loaded_model, tmp_path):
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Qwen/Qwen2-VL-2B-Instruct's preprocessor_config.json.
    real = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2,
                                    temporal_patch_size=2, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    loaded = with_image_processor(loaded_model("qwen2_vl"), real)
    runtime = Preprocessor.load(spec_folder(loaded, tmp_path))
    assert runtime.images.max_pixels == 12845056
    for width, height in [(20, 600), (600, 20), (10, 10), (1000, 700), (3000, 25)]:
        assert_same_inputs(loaded, runtime, ["what is it"], [[picture(width, height, seed=height)]])
    assert_same_inputs(loaded, runtime, TEXTS[:2], [[picture(640, 480, 1)], [picture(90, 700, 2), picture(50, 50, 3)]])


def test_llava_onevision_05b_image_processor_at_real_size(loaded_model, tmp_path):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf: SigLIP 384, mean/std 0.5, 36 pinpoints from 384 to 2304.
    pinpoints = [[384 * rows, 384 * columns] for rows in range(1, 7) for columns in range(1, 7)]
    real = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                           image_grid_pinpoints=pinpoints)
    loaded = with_image_processor(loaded_model("llava_onevision"), real, num_image_tokens=729)
    runtime = Preprocessor.load(spec_folder(loaded, tmp_path))
    assert runtime.images.pad_color == (127, 127, 127)
    # 1500x1100 picks the 1152x1536 pinpoint: 12 tiles, more than anyres_max_9, so its features are scaled down.
    for width, height in [(20, 600), (600, 20), (10, 10), (1000, 700), (1500, 1100)]:
        assert_same_inputs(loaded, runtime, ["what is it"], [[picture(width, height, seed=width)]])
    assert_same_inputs(loaded, runtime, TEXTS[:2], [[picture(640, 480, 1)], [picture(90, 700, 2), picture(50, 50, 3)]])


def test_llava_15_image_processor_at_real_size(loaded_model, tmp_path):
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px, shortest edge 336 then a center crop, bicubic; 576 tokens.
    real = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3,
                                 image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    loaded = with_image_processor(loaded_model("llava"), real)
    runtime = Preprocessor.load(spec_folder(loaded, tmp_path))
    assert (runtime.images.shortest_edge, runtime.images.crop_size, runtime.images.num_image_tokens) == (336, (336, 336), 576)
    for width, height in [(20, 600), (600, 20), (10, 10), (1000, 700), (337, 335), (3000, 25)]:
        assert_same_inputs(loaded, runtime, ["what is it"], [[picture(width, height, seed=width)]])
    assert_same_inputs(loaded, runtime, TEXTS[:2], [[picture(640, 480, 1)], [picture(90, 700, 2), picture(50, 50, 3)]])


def test_gemma3_4b_image_processor_at_real_size(loaded_model, tmp_path):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    # google/gemma-3-4b-it: SigLIP at 896 px, bilinear, mean/std 0.5, 256 soft tokens per image.
    real = Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    loaded = with_image_processor(loaded_model("gemma3"), real, image_seq_length=256)
    loaded.processor.full_image_sequence = loaded.processor.full_image_sequence.replace(
        loaded.tokenizer.image_token * 4, loaded.tokenizer.image_token * 256)
    runtime = Preprocessor.load(spec_folder(loaded, tmp_path))
    assert (runtime.images.size, runtime.images.image_seq_length) == ((896, 896), 256)
    for width, height in [(20, 600), (1000, 700), (3000, 25)]:
        assert_same_inputs(loaded, runtime, ["what is it"], [[picture(width, height, seed=width)]])
    assert_same_inputs(loaded, runtime, TEXTS[:2], [[picture(640, 480, 1)], [picture(90, 700, 2), picture(50, 50, 3)]])


@pytest.mark.parametrize("name, longest_edge, frame, tokens", [
    ("smolvlm", 2048, 512, 64),  # HuggingFaceTB/SmolVLM-256M-Instruct
    ("idefics3", 4 * 364, 364, 169),  # HuggingFaceM4/Idefics3-8B-Llama3
])
def test_idefics3_and_smolvlm_image_processors_at_real_size(name, longest_edge, frame, tokens, loaded_model, tmp_path):
    """Lanczos resizes of the longest edge, then to multiples of the frame, tiles row by row and a global view."""
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    real = Idefics3ImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": frame},
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    loaded = with_image_processor(loaded_model(name), real, image_seq_len=tokens)
    runtime = Preprocessor.load(spec_folder(loaded, tmp_path))
    assert (runtime.images.longest_edge, runtime.images.frame_size, runtime.images.image_seq_len) == (longest_edge, frame, tokens)
    for width, height in [(20, 600), (600, 20), (10, 10), (1000, 700), (frame, frame), (frame + 1, frame - 1)]:
        assert_same_inputs(loaded, runtime, ["what is it"], [[picture(width, height, seed=width)]])
    assert_same_inputs(loaded, runtime, TEXTS[:2], [[picture(640, 480, 1)], [picture(90, 700, 2), picture(50, 50, 3)]])


def test_idefics3_without_image_splitting(loaded_model, tmp_path):
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    real = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=False)
    loaded = with_image_processor(loaded_model("idefics3"), real)
    runtime = Preprocessor.load(spec_folder(loaded, tmp_path))
    assert_same_inputs(loaded, runtime, TEXTS[:2], [[picture(640, 480, 1)], [picture(90, 700, 2), picture(50, 50, 3)]])


def test_qwen3_vl_2b_image_processor_at_real_size(loaded_model, tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Qwen/Qwen3-VL-2B-Instruct: patch 16, merge 2, mean/std 0.5, 65536 .. 16777216 pixels.
    real = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, size={"shortest_edge": 65536, "longest_edge": 16777216})
    loaded = with_image_processor(loaded_model("qwen3_vl"), real)
    runtime = Preprocessor.load(spec_folder(loaded, tmp_path))
    assert (runtime.images.patch_size, runtime.images.min_pixels) == (16, 65536)
    for width, height in [(20, 600), (1000, 700), (3000, 25)]:
        assert_same_inputs(loaded, runtime, ["what is it"], [[picture(width, height, seed=height)]])


@pytest.mark.parametrize("options", [
    # LlavaImageProcessor's do_pad: a square of the mean colour around the image before resizing (LLaVA's "pad" mode).
    {"processor": "llava", "do_pad": True},
    # A crop larger than the resized image: transformers centres the image on black first.
    {"processor": "clip", "size": {"shortest_edge": 20}, "crop_size": {"height": 28, "width": 42}},
    # A fixed size and no crop (SigLIP-style LLaVA variants).
    {"processor": "clip", "size": {"height": 28, "width": 56}, "do_center_crop": False},
])
def test_llava_image_processor_variants(options, loaded_model, tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    options = dict(options)
    kind = options.pop("processor")
    defaults = {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}}
    image_processor = (LlavaImageProcessorPil if kind == "llava" else CLIPImageProcessorPil)(**{**defaults, **options})
    loaded = with_image_processor(loaded_model("llava"), image_processor)
    runtime = Preprocessor.load(spec_folder(loaded, tmp_path))
    for width, height in [(20, 600), (600, 20), (10, 10), (57, 113), (1, 1)]:
        assert_same_inputs(loaded, runtime, ["what is it"], [[picture(width, height, seed=height)]])
    assert_same_inputs(loaded, runtime, TEXTS[:2], [[picture(64, 48, 1)], [picture(9, 70, 2), picture(50, 50, 3)]])


def test_llava_shortest_edge_without_crop_is_refused(loaded_model, tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    loaded = with_image_processor(loaded_model("llava"), CLIPImageProcessorPil(size={"shortest_edge": 28}, do_center_crop=False))
    with pytest.raises(ExportError, match="without a center crop"):
        write_preprocessing(loaded, prompt_metadata(loaded, TEMPLATE, 1), tmp_path)
    assert list(tmp_path.iterdir()) == []


# -- refusals and files --------------------------------------------------------------------------------------------

def test_runtime_refuses_what_the_builder_cannot_encode(loaded_model, preprocessor):
    loaded, runtime = loaded_model("qwen2_vl"), preprocessor("qwen2_vl")
    thin = picture(2, 600)  # aspect ratio 300: transformers' smart_resize refuses it too
    with pytest.raises(ValueError, match="aspect ratio"):
        loaded.encode([loaded.render(TEMPLATE, "a", 1)], [[thin]])
    with pytest.raises(InputError, match="aspect ratio 300"):
        runtime.encode([runtime.render("a", 1)], [[thin]])
    with pytest.raises(InputError, match="mixes items"):
        runtime.encode([runtime.render("a", 1), runtime.render("b", 0)], [[picture(30, 30)], []])
    with pytest.raises(InputError, match="placeholder"):  # the image token typed into the text
        runtime.encode([runtime.render("look <|image_pad|>", 1)], [[picture(30, 30)]])
    with pytest.raises(InputError, match="1 image placeholder"):
        runtime.encode([runtime.render("a", 1)], [[picture(30, 30), picture(30, 30)]])


def test_writing_is_deterministic_and_refuses_to_overwrite(loaded_model, tmp_path):
    loaded = loaded_model("qwen2_vl")
    prompt = prompt_metadata(loaded, TEMPLATE, 1)
    loaded.encode([loaded.render(TEMPLATE, "a", 0)], [[]])  # leaves padding state in the tokenizer's backend
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    spec = write_preprocessing(loaded, prompt, first)
    assert write_preprocessing(loaded, prompt, second) == spec
    for name in (SPEC_FILE, TOKENIZER_FILE):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    saved_tokenizer = json.loads((first / TOKENIZER_FILE).read_text())
    assert saved_tokenizer["padding"] is None and saved_tokenizer["truncation"] is None
    with pytest.raises(OutputPathError, match="exists"):
        write_preprocessing(loaded, prompt, first)
    write_preprocessing(loaded, prompt, first, force=True)
    with pytest.raises(OutputPathError, match="does not exist"):
        write_preprocessing(loaded, prompt, tmp_path / "missing")


def test_a_chat_template_the_runtime_cannot_reproduce_is_refused(loaded_model, tmp_path):
    loaded = loaded_model("qwen2_vl")
    numbered = copy.copy(loaded.processor)
    # Numbered pictures: the block differs per image, so no "before + image * n + after" rule exists.
    numbered.chat_template = (
        "{% for message in messages %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
        "Picture {{ loop.index }}: <|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endfor %}"
    )
    loaded = dataclasses.replace(loaded, processor=numbered)
    with pytest.raises(ExportError, match="one block repeated"):
        write_preprocessing(loaded, prompt_metadata(loaded, TEMPLATE, 1), tmp_path)
    assert list(tmp_path.iterdir()) == []
