"""Write what the torch-free runtime needs to feed a model exactly as the builder does: tokenizer.json and the
preprocessing spec (preprocess.json, read by savpack_runtime.preprocess.Preprocessor; fields in docs/preprocessing.md).

The spec is read off the loaded model's own processor, then checked before anything is written: the runtime,
given the spec, must render the builder's prompts character for character and encode a probe batch to the builder's
tensors. A model whose preprocessing the runtime cannot reproduce is refused with the reason, not exported wrongly.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from savpack_runtime import files
from savpack_runtime import format as fmt
from savpack_runtime.errors import PreprocessSpecError, SavpackError
from savpack_runtime.image_processing import (
    Gemma3Images, Idefics3Images, LlavaImages, LlavaOnevisionImages, PixelSteps, Qwen2VLImages, anyres_max_patches,
)
from savpack_runtime.preprocess import SPEC_FILE, SPEC_FORMAT, SPEC_VERSION, TOKENIZER_FILE, Preprocessor, RenderRule, TextRule

from .errors import ExportError
from .models import LoadedModel

PROBE_TEXTS = ("a red circle", "", "  spaced  out  ", "two\nlines, {braces} and émojis 🙂")
PROBE_IMAGE_COUNTS = 4  # the render rule must hold for 0..4 images
PIXEL_TOLERANCE = 1e-5


def write_preprocessing(loaded: LoadedModel, prompt: dict[str, Any], folder: str | Path, force: bool = False) -> dict[str, Any]:
    """Write `tokenizer.json` and `preprocess.json` into `folder` (atomically, the spec last) and return the spec.

    `prompt` is the pack's prompt (savpack_runtime.format.PROMPT_FIELDS). Raises ExportError when the runtime could
    not reproduce this model's preprocessing, OutputPathError when a file exists and `force` is False.
    """
    folder = Path(folder)
    spec = preprocessing_spec(loaded, prompt)
    tokenizer_text = tokenizer_json(loaded)
    try:
        preprocessor = Preprocessor.from_spec(spec, Tokenizer.from_str(tokenizer_text), where="the spec written")
    except PreprocessSpecError as exc:
        raise ExportError(f"{loaded.model_id}: preprocessing spec is invalid: {exc}") from None
    problems = check_reproduced(loaded, preprocessor)
    if problems:
        raise ExportError(f"{loaded.model_id}: the runtime would not preprocess as the builder does:\n  " + "\n  ".join(problems))
    spec_text = json.dumps(spec, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    for name in (TOKENIZER_FILE, SPEC_FILE):
        files.check_output_path(folder / name, force)
    files.atomic_write(folder / TOKENIZER_FILE, lambda handle: handle.write(tokenizer_text.encode("utf-8")), force)
    files.atomic_write(folder / SPEC_FILE, lambda handle: handle.write(spec_text.encode("utf-8")), force)
    return spec


def preprocessing_spec(loaded: LoadedModel, prompt: dict[str, Any]) -> dict[str, Any]:
    """The spec as a JSON-ready dict (lists, not tuples: as it reads back from the file)."""
    missing = [name for name in fmt.PROMPT_FIELDS if name not in prompt]
    if missing:
        raise ExportError(f"the pack's prompt lacks field(s) {missing}")
    family = loaded.family
    images = image_rule(family.name, loaded.processor) if family.takes_images else None
    # Image-text families mark image tokens in `mm_token_type_ids` (Gemma 3 names it token_type_ids); BERT's
    # token_type_ids are the tokenizer's segment ids.
    types_name = next((name for name in ("mm_token_type_ids", "token_type_ids") if name in family.forward_inputs), None)
    marks_images = family.takes_images and types_name is not None
    text = TextRule(
        add_special_tokens=loaded.add_special_tokens, pad_id=int(loaded.tokenizer.pad_token_id),
        padding_side=loaded.tokenizer.padding_side, max_positions=loaded.max_positions,
        mm_token_types=_mm_token_types(loaded.processor) if marks_images else None,
        mm_token_types_name=types_name if marks_images else "mm_token_type_ids",
        token_type_ids=not family.takes_images and types_name == "token_type_ids",
        position_ids_from_mask=family.positions_from_mask,
    )
    spec = {
        "format": SPEC_FORMAT,
        "format_version": SPEC_VERSION,
        "family": loaded.family.name,
        "prompt": {name: prompt[name] for name in fmt.PROMPT_FIELDS},
        "render": asdict(render_rule(loaded, prompt["template"], int(prompt["image_count"]))),
        "text": asdict(text),
        "image": asdict(images) if images is not None else None,
    }
    return json.loads(json.dumps(spec))


def tokenizer_json(loaded: LoadedModel) -> str:
    """The tokenizer the builder really uses (its backend, after transformers rebuilt any part of it), without the
    padding and truncation state a previous call left in it: the runtime pads by itself."""
    backend = getattr(loaded.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{loaded.model_id}: tokenizer {type(loaded.tokenizer).__name__} is not a fast (tokenizers) "
                          "tokenizer; the runtime needs a tokenizer.json")
    clean = Tokenizer.from_str(backend.to_str())
    clean.no_padding()
    clean.no_truncation()
    return clean.to_str()


def render_rule(loaded: LoadedModel, template: str, image_count: int = 1) -> RenderRule:
    """Find `before + image * n + after` in the builder's renderings for 0..4 images (1..4 when the chat template
    renders a text-only turn differently, as Idefics3's does, and the pack's prompt holds images)."""
    if not loaded.family.takes_images or loaded.chat_template is None:
        # Text-only families ignore images; without a chat template there is nowhere to put them.
        return RenderRule("", "", loaded.render_template(template, 0), max_images=0)
    renders = [loaded.render_template(template, count) for count in range(PROBE_IMAGE_COUNTS + 1)]
    step = len(renders[2]) - len(renders[1])
    for first in (0, 1):
        # Of equivalent cuts, the last: "<image>\n" reads better than "\n<image>".
        for cut in reversed(range(len(renders[1]) - step + 1)) if step > 0 else ():
            before, image, after = renders[1][:cut], renders[1][cut : cut + step], renders[1][cut + step :]
            if all(renders[count] == before + image * count + after for count in range(first, len(renders))):
                return RenderRule(before, image, after, max_images=None, min_images=first)
        if image_count == 0:  # a text-only prompt of an image-text model: its one rendering is all it needs
            return RenderRule("", "", renders[0], max_images=0)
    raise ExportError(
        f"{loaded.model_id}: its chat template does not render n images as one block repeated n times "
        f"(renderings for 0..{PROBE_IMAGE_COUNTS} images: {renders}); the runtime cannot reproduce it"
    )


def image_rule(family: str, processor: Any) -> PixelSteps:
    """The family's image section, read off a transformers processor (PIL backend image processor inside)."""
    image_processor = processor.image_processor
    if not image_processor.do_resize:
        raise ExportError("image processor has do_resize=False; the runtime reproduces resizing processors only")
    common = dict(
        image_token=processor.image_token, image_token_id=int(processor.image_token_id),
        # The PIL backend falls back to bilinear when no filter is set.
        resample=int(image_processor.resample) if image_processor.resample is not None else int(Image.Resampling.BILINEAR),
        do_rescale=bool(image_processor.do_rescale), rescale_factor=float(image_processor.rescale_factor),
        do_normalize=bool(image_processor.do_normalize),
        image_mean=_three(image_processor.image_mean), image_std=_three(image_processor.image_std),
    )
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):  # Qwen2.5-VL's and Qwen3-VL's image processor is Qwen2-VL's
        return Qwen2VLImages(
            **common, min_pixels=int(image_processor.size["shortest_edge"]), max_pixels=int(image_processor.size["longest_edge"]),
            patch_size=int(image_processor.patch_size), temporal_patch_size=int(image_processor.temporal_patch_size),
            merge_size=int(image_processor.merge_size),
        )
    if family == "llava_onevision":
        return _llava_onevision_rule(processor, common)
    if family == "llava":
        return _llava_rule(processor, common)
    if family == "gemma3":
        return _gemma3_rule(processor, common)
    if family in ("idefics3", "smolvlm"):
        return _idefics3_rule(processor, common)
    raise ExportError(f"family {family!r}: the runtime has no image preprocessing for it")


def _gemma3_rule(processor: Any, common: dict[str, Any]) -> Gemma3Images:
    image_processor, tokenizer = processor.image_processor, processor.tokenizer
    if getattr(image_processor, "do_pan_and_scan", False):
        raise ExportError("image processor has do_pan_and_scan=True; the runtime does not reproduce pan-and-scan crops")
    size = image_processor.size
    if not (size.height and size.width):
        raise ExportError(f"image processor size {dict(size)} has no height and width; the runtime needs both")
    return Gemma3Images(
        **common, size=(int(size.height), int(size.width)), image_seq_length=int(processor.image_seq_length),
        soft_token=tokenizer.image_token, soft_token_id=int(tokenizer.image_token_id), end_token=tokenizer.eoi_token,
    )


def _idefics3_rule(processor: Any, common: dict[str, Any]) -> Idefics3Images:
    """Idefics3 and SmolVLM: the same image processor and the same prompt strings."""
    image_processor = processor.image_processor
    size, frame = image_processor.size, image_processor.max_image_size
    if not size.longest_edge:
        raise ExportError(f"image processor size {dict(size)}: the runtime reproduces a 'longest_edge' resize only")
    if not image_processor.do_pad:
        raise ExportError("image processor has do_pad=False; the model needs frames padded into one tensor")
    global_token = getattr(processor, "global_image_token", None) or processor.global_image_tag
    return Idefics3Images(
        **common, longest_edge=int(size.longest_edge), frame_size=int(frame["longest_edge"]),
        do_image_splitting=bool(image_processor.do_image_splitting), image_seq_len=int(processor.image_seq_len),
        fake_token=processor.fake_image_token, global_token=global_token,
    )


def _llava_onevision_rule(processor: Any, common: dict[str, Any]) -> LlavaOnevisionImages:
    image_processor = processor.image_processor
    size, crop = image_processor.size, image_processor.crop_size
    if not (size.height and size.width):
        raise ExportError(f"image processor size {dict(size)} has no height and width; the runtime needs both")
    if image_processor.do_center_crop:
        raise ExportError("image processor has do_center_crop=True; the runtime does not reproduce center cropping")
    if not processor.num_image_tokens:
        raise ExportError("processor has no num_image_tokens (processor_config.json); image token counts are unknown")
    return LlavaOnevisionImages(
        **common, size=(int(size.height), int(size.width)),
        # As transformers: tiles take the crop size when one is set, else the view size.
        tile_size=int(crop.height if crop and crop.height else size.height),
        image_grid_pinpoints=tuple((int(h), int(w)) for h, w in image_processor.image_grid_pinpoints),
        # transformers pads multi-image squares with the processor's mean as truncated 8-bit values.
        pad_color=tuple(int(value * 255) for value in _three(image_processor.image_mean)),
        num_image_tokens=int(processor.num_image_tokens),
        vision_feature_select_strategy="default" if processor.vision_feature_select_strategy == "default" else "full",
        max_num_patches=_max_num_patches(processor.vision_aspect_ratio),
    )


def _max_num_patches(vision_aspect_ratio: str) -> int:
    try:
        return anyres_max_patches(vision_aspect_ratio)
    except ValueError as exc:
        raise ExportError(f"processor: {exc}; the runtime reproduces anyres_max_N only") from None


def _llava_rule(processor: Any, common: dict[str, Any]) -> LlavaImages:
    """LLaVA-1.5: CLIPImageProcessor (resize, center crop) or LlavaImageProcessor (pad to a square first)."""
    image_processor = processor.image_processor
    size, crop = image_processor.size, image_processor.crop_size
    # LlavaImageProcessor's do_pad pads to a square before resizing; the base processors' do_pad pads the batch.
    squares = hasattr(image_processor, "pad_to_square")
    if getattr(image_processor, "do_pad", False) and not squares:
        raise ExportError(f"{type(image_processor).__name__} has do_pad=True; the runtime does not reproduce batch padding")
    if (size.shortest_edge and size.longest_edge) or not (size.shortest_edge or (size.height and size.width)):
        raise ExportError(f"image processor size {dict(size)}: the runtime reproduces 'shortest_edge' alone or "
                          "'height' and 'width'")
    crop_size = (int(crop.height), int(crop.width)) if image_processor.do_center_crop else None
    if size.shortest_edge and crop_size is None:
        raise ExportError(f"image processor resizes the shortest edge to {size.shortest_edge} without a center crop: "
                          "images would keep their aspect ratio, and LLaVA's vision tower takes one size")
    height, width = crop_size or (int(size.height), int(size.width))
    if not processor.patch_size:
        raise ExportError("processor has no patch_size (processor_config.json); image token counts are unknown")
    # LlavaProcessor.replace_image_token: patches of the final image, plus CLS, minus it again for "default".
    tokens = (height // processor.patch_size) * (width // processor.patch_size) + int(processor.num_additional_image_tokens)
    tokens -= 1 if processor.vision_feature_select_strategy == "default" else 0
    return LlavaImages(
        **common, pad_to_square=bool(squares and image_processor.do_pad),
        pad_color=tuple(int(value * 255) for value in _three(image_processor.image_mean)),
        shortest_edge=int(size.shortest_edge) if size.shortest_edge else None,
        size=(int(size.height), int(size.width)) if not size.shortest_edge else None,
        crop_size=crop_size, num_image_tokens=tokens,
    )


def _mm_token_types(processor: Any) -> tuple[tuple[int, int], ...]:
    """ProcessorMixin.create_mm_token_type_ids: 1 for image, 2 for video, 3 for audio tokens."""
    pairs = []
    for kind, ids in ((1, processor.image_token_ids), (2, processor.video_token_ids), (3, processor.audio_token_ids)):
        pairs += [(int(token_id), kind) for token_id in ids if token_id is not None]
    return tuple(pairs)


def _three(value: Any) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, numbers.Number) else list(value)
    if len(values) != 3:
        raise ExportError(f"image mean/std {value!r}: expected one value or three (R, G, B)")
    return tuple(float(v) for v in values)


# -- checking the spec against the builder --------------------------------------------------------------------------

def check_reproduced(loaded: LoadedModel, preprocessor: Preprocessor) -> list[str]:
    """Every difference between the builder and the runtime on probe prompts and a probe batch (empty: none)."""
    template = preprocessor.prompt["template"]
    least, limit = preprocessor.render_rule.min_images, preprocessor.render_rule.max_images
    # The probes compare preprocessing, not context length (a small-context model may still take large images).
    preprocessor = dataclasses.replace(preprocessor, text=dataclasses.replace(preprocessor.text, max_positions=None))
    counts = range(least, (PROBE_IMAGE_COUNTS if limit is None else limit) + 1)
    problems = []
    for count in counts:
        for text in PROBE_TEXTS:
            built, ran = loaded.render(template, text, count), preprocessor.render(text, count)
            if built != ran:
                problems.append(f"render({text!r}, {count} images): builder {built!r}, runtime {ran!r}")
    batches = [([], [])] if least == 0 else []
    if limit is None:
        batches.append(([probe_image(70, 45, 1)], [probe_image(33, 120, 2)]))
    for images in batches:
        prompts = [loaded.render(template, text, len(item)) for text, item in zip(PROBE_TEXTS[:2], images)]
        try:
            ran = preprocessor.encode(prompts, list(images))
        except SavpackError as exc:
            problems.append(f"encode failed in the runtime: {exc}")
            continue
        problems += input_differences(builder_inputs(loaded, prompts, list(images)), ran)
    return problems


def builder_inputs(loaded: LoadedModel, prompts: list[str], images: list[list[Image.Image]]) -> dict[str, np.ndarray]:
    """LoadedModel.encode as numpy arrays."""
    encoded = loaded.encode(prompts, images)
    return {name: value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value) for name, value in encoded.items()}


def input_differences(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], tolerance: float = PIXEL_TOLERANCE) -> list[str]:
    """Names, dtypes and shapes must agree; integers exactly, floats within `tolerance`."""
    if sorted(expected) != sorted(actual):
        return [f"inputs are {sorted(actual)}, expected {sorted(expected)}"]
    problems = []
    for name, want in expected.items():
        got = actual[name]
        if got.dtype != want.dtype or got.shape != want.shape:
            problems.append(f"{name}: {got.dtype} {got.shape}, expected {want.dtype} {want.shape}")
        elif np.issubdtype(want.dtype, np.floating):
            worst = float(np.max(np.abs(got - want), initial=0.0))
            if not worst <= tolerance:
                problems.append(f"{name}: differs by up to {worst:.3g} (tolerance {tolerance})")
        elif not np.array_equal(got, want):
            problems.append(f"{name}: {int((got != want).sum())} value(s) differ")
    return problems


def probe_image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic RGB picture with detail at every scale (noise over gradients), so resizing is exercised."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(-40, 41, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
