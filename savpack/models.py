"""Load a frozen Hugging Face model with its preprocessor, find its attention heads, render and encode prompts."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torch import nn

from savpack_runtime import format as fmt
from savpack_runtime.items import IMAGE_MARKER

from .errors import DataError, ModelError
from .families import CAUSAL_LM, FAMILIES, Family, family_for_model_type, supported_summary
from .model_files import check_declared_size, check_loading_info, check_model_files, check_text_config, local_model_path

DEVICES_HELP = "auto|cpu|cuda[:N]"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Path components that mark vision, audio and projector modules: their attention is not the language model's.
_NON_TEXT_WORDS = ("vision", "visual", "image", "projector", "audio", "speech")
_OUTPUT_PROJECTION_NAMES = ("o_proj", "c_proj", "out_proj", "dense")
_TEXT_SENTINEL = "SAVPACKTEXTSLOT7f3a"
FINGERPRINT_SCHEME = "signs/1"  # what LoadedModel.fingerprint hashes; a new scheme gives every model a new fingerprint
FINGERPRINT_SPREAD = 128


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelError(f"--device {device!r} is not one of {DEVICES_HELP}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif resolved.type != "cpu":
        raise ModelError(f"--device {device!r} is not one of {DEVICES_HELP}")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bfloat16 is 5-8x slower than float32 on CPUs without bf16 instructions; on CUDA it halves memory.
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r} is not one of auto|{'|'.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class LoadedModel:
    """A frozen model ready for head extraction: its modules, preprocessor, grid and identity."""

    model: nn.Module
    family: Family
    processor: Any  # the transformers processor (image-text families) or the tokenizer (text-only)
    tokenizer: Any
    model_id: str
    revision: str
    grid: tuple[int, int, int]  # (layers, heads, head_dim)
    attention_outputs: list[nn.Module]  # per decoder layer: the module whose input is the per-head attention output
    device: torch.device
    dtype: torch.dtype
    max_positions: int | None
    use_chat_template: bool = True
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def chat_template(self) -> str | None:
        if not self.use_chat_template:
            return None
        return getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)

    @property
    def add_special_tokens(self) -> bool:
        """Whether tokenising a rendered prompt adds the tokenizer's special tokens (BOS), as transformers does:
        plain text gets them; a text model's chat template holds them (tokenizer.apply_chat_template adds none); an
        image-text processor adds them unless the rendered prompt already starts with BOS (as
        processor.apply_chat_template does: no double BOS for Gemma 3 or Idefics3, whose templates hold one)."""
        if self.chat_template is None:
            return True
        if not self.family.takes_images:
            return False
        bos = self.tokenizer.bos_token
        return not (bos and self.render_template(fmt.TEXT_PLACEHOLDER, 0).startswith(bos))

    def chat_template_sha256(self) -> str | None:
        template = self.chat_template
        return hashlib.sha256(template.encode()).hexdigest() if template else None

    def render(self, template: str, text: str, image_count: int) -> str:
        """The full prompt string for one item: the user template with its text, through the chat template.

        With images, `<image>` markers in the user text place them (interleaved, in order; their count must equal
        image_count); without markers the images come before the text. An item without images keeps `<image>` as text.
        """
        user_text = template.replace(fmt.TEXT_PLACEHOLDER, text)
        if self.chat_template is None:
            if image_count:
                raise ModelError(f"{self.model_id}: has no chat template, so images cannot be placed in the prompt")
            return user_text
        content: Any = _content_parts(user_text, image_count) if self.family.takes_images else user_text
        messages = [{"role": "user", "content": content}]
        # The tokenizer renders the processor's template too: some processors' own apply_chat_template (SmolVLM's)
        # read their video processor, which savpack does not build (docs/decisions.md). Same Jinja, same string.
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def render_template(self, template: str, image_count: int) -> str:
        """The rendered prompt with `{text}` left in place: what the pack stores and the runtime fills."""
        return self.render(template, _TEXT_SENTINEL, image_count).replace(_TEXT_SENTINEL, fmt.TEXT_PLACEHOLDER)

    def encode(self, prompts: list[str], images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        """Tokenise (and preprocess images for) a batch, padded on the family's side, as model inputs on the device."""
        if self.family.takes_images:
            has_images = any(images)
            if has_images and not all(images):
                raise ModelError("a batch mixes items with and without images; give every item an image or none")
            encoded = self.processor(text=prompts, images=images if has_images else None, padding=True,
                                     return_tensors="pt", add_special_tokens=self.add_special_tokens)
        else:
            encoded = self.tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=self.add_special_tokens)
        inputs = {name: encoded[name] for name in self.family.forward_inputs if name in encoded}
        if self.family.positions_from_mask:
            # Real tokens count 0, 1, 2, ... whatever padding precedes them: the positions each item has alone.
            inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return {name: value.to(self.device) if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}

    def fingerprint(self) -> str:
        """Identity of the weights, exactly independent of device and load dtype (float32, float16, bfloat16).

        sha256 over the text grid and, for every parameter: its name, shape, and the signs of a sample of its values
        (the first and last 64 and FINGERPRINT_SPREAD spread evenly between). Signs only: every IEEE cast keeps a
        value's sign (a value too small for float16 becomes a signed zero), whereas any rounding of the values
        themselves differs between dtypes: float32 -> float16 -> bfloat16 lands on another bfloat16 than float32 ->
        bfloat16 for about one value in sixteen (docs/decisions.md). Cheap (no full pass over the weights), yet a
        retrained, fine-tuned or other-sized model differs.
        """
        if self._fingerprint is None:
            hasher = hashlib.sha256(json.dumps({"grid": list(self.grid), "fingerprint": FINGERPRINT_SCHEME}).encode())
            for name, parameter in sorted(self.model.named_parameters()):
                flat = parameter.detach().reshape(-1)
                # Integer steps: a float linspace rounds indices of tensors above 2^24 values past the end.
                steps = torch.arange(FINGERPRINT_SPREAD if flat.numel() else 0, dtype=torch.int64, device=flat.device)
                spread = steps * (flat.numel() - 1) // (FINGERPRINT_SPREAD - 1)
                sample = torch.cat([flat[:64], flat[spread], flat[-64:]])
                hasher.update(f"{name}:{list(parameter.shape)}".encode())
                hasher.update(np.packbits(torch.signbit(sample).cpu().numpy()).tobytes())
            self._fingerprint = hasher.hexdigest()
        return self._fingerprint

    def model_metadata(self) -> dict[str, Any]:
        return {"id": self.model_id, "revision": self.revision, "family": self.family.name,
                "grid": list(self.grid), "fingerprint": self.fingerprint()}


def _content_parts(user_text: str, image_count: int) -> list[dict[str, str]]:
    """Chat message content: image and text parts in the order `<image>` markers give, or images first."""
    if image_count == 0:
        return [{"type": "text", "text": user_text}]
    pieces = user_text.split(IMAGE_MARKER)
    markers = len(pieces) - 1
    if markers == 0:
        return [{"type": "image"}] * image_count + [{"type": "text", "text": user_text}]
    if markers != image_count:
        raise DataError(f"the prompt holds {markers} {IMAGE_MARKER} marker(s) but the item has {image_count} image(s); "
                        f"give one marker per image (video frames count as images), or none to put the images first")
    parts: list[dict[str, str]] = []
    for index, piece in enumerate(pieces):
        if piece:
            parts.append({"type": "text", "text": piece})
        if index < markers:
            parts.append({"type": "image"})
    return parts


def load_model(
    model: str,
    revision: str | None = None,
    gguf_file: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    family: str | None = None,
    use_chat_template: bool = True,
) -> LoadedModel:
    """Load `model` (hub id, local folder, or .gguf file) frozen, in eval mode, on `device` in `dtype`."""
    import transformers

    source = model
    local = local_model_path(model)
    if local is not None:
        check_model_files(local)
        source = str(local)
        if local.suffix.lower() == ".gguf" and local.is_file():
            source, gguf_file = str(local.parent), local.name
    hub_kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf_file:
        hub_kwargs["gguf_file"] = gguf_file
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)

    with quiet_transformers(), model_errors(model):
        config = transformers.AutoConfig.from_pretrained(source, **hub_kwargs)
    chosen = _choose_family(config, family, model)
    check_text_config(config.get_text_config(decoder=True), model)  # before any weight is allocated
    with quiet_transformers(), model_errors(model):
        auto_class = getattr(transformers, chosen.auto_class)
        weight_kwargs = dict(hub_kwargs)
        if gguf_file:
            weight_kwargs.update(dequantised_load_kwargs())
        elif local is not None:
            check_declared_size(auto_class, config, local, model)
        network, loading_info = auto_class.from_pretrained(source, dtype=torch_dtype, output_loading_info=True, **weight_kwargs)
        check_loading_info(loading_info, model)
        processor, tokenizer = _load_preprocessor(chosen, source, hub_kwargs)
    network.to(torch_device).eval().requires_grad_(False)
    tokenizer.padding_side = chosen.padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    text_config = network.config.get_text_config(decoder=True)
    grid = check_text_config(text_config, model)
    outputs = find_attention_outputs(network, grid, model)
    return LoadedModel(
        model=network, family=chosen, processor=processor, tokenizer=tokenizer, model_id=model,
        revision=_revision_of(network.config, source, revision, gguf_file),
        grid=grid, attention_outputs=outputs, device=torch_device, dtype=torch_dtype,
        max_positions=getattr(text_config, "max_position_embeddings", None), use_chat_template=use_chat_template,
    )


def dequantised_load_kwargs() -> dict:
    """from_pretrained arguments that unpack every GGUF weight into a plain float tensor. Newer transformers can keep
    some architectures' weights packed in GGUF blocks (GgufLinear modules); savpack needs plain Linear layers to hook
    and float weights to save."""
    import transformers

    config_class = getattr(transformers, "GgufConfig", None)
    return {"quantization_config": config_class(dequantize=True)} if config_class is not None else {}


@contextmanager
def model_errors(model: str):
    """Whatever transformers, safetensors or the hub client raise while reading a model (their error types are many
    and change between releases) becomes one ModelError naming the model; --debug still shows the cause."""
    try:
        yield
    except ModelError:
        raise
    except ImportError as exc:
        raise ModelError(f"{model}: a package the model needs is missing: {exc}") from exc
    except Exception as exc:
        hint = "" if local_model_path(model) else " (not a local folder; the hub cannot be reached offline)"
        raise ModelError(f"cannot load model {model!r}{hint}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc


@contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off while loading (savpack reports what matters itself)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()


def _choose_family(config: Any, family: str | None, model: str) -> Family:
    if family is not None:
        if family not in FAMILIES:
            raise ModelError(f"--family {family!r} is not one of {sorted(FAMILIES)}")
        return FAMILIES[family]
    found = family_for_model_type(config.model_type)
    if found is None:
        raise ModelError(
            f"{model}: model type {config.model_type!r} is not supported. Supported families: {supported_summary()}. "
            f"A text-only decoder of another type may work with --family {CAUSAL_LM.name}."
        )
    return found


def _load_preprocessor(family: Family, source: str, hub_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """(processor, tokenizer). Image-text processors are assembled from their image processor (PIL backend) and
    tokenizer, without the video processor: video processors need torchvision, which savpack does not require,
    and the PIL image processor is the one the torch-free runtime reproduces (docs/decisions.md).
    """
    import transformers
    from transformers.processing_utils import ProcessorMixin

    tokenizer_kwargs = {key: value for key, value in hub_kwargs.items() if key != "trust_remote_code" or value}
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
    if not family.takes_images:
        return tokenizer, tokenizer
    processor_class = getattr(transformers, family.processor_class)
    try:
        image_processor = transformers.AutoImageProcessor.from_pretrained(source, backend="pil", **hub_kwargs)
    except OSError:
        raise ModelError(f"{source}: no image processor (preprocessor_config.json) found; a {family.name} model folder needs one") from None
    processor_dict, init_kwargs = processor_class.get_processor_dict(source, **hub_kwargs)
    parts = {"image_processor": image_processor, "tokenizer": tokenizer}
    args = [parts.get(name) for name in processor_class.get_attributes()]
    # ProcessorMixin type-checks every part, and cannot resolve the video processor's base class without torchvision.
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
        processor = processor_class.from_args_and_dict(args, processor_dict, **init_kwargs)
    return processor, tokenizer


def find_decoder_layers(model: nn.Module, num_layers: int, name: str = "model") -> tuple[str, nn.ModuleList]:
    """The language model's layer list: the shallowest ModuleList of `num_layers` outside vision/audio towers."""
    candidates = [
        (path, module) for path, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
        and not any(word in path.lower() for word in _NON_TEXT_WORDS)
    ]
    if not candidates:
        raise ModelError(f"{name}: no list of {num_layers} decoder layers found outside the vision tower")
    return min(candidates, key=lambda item: (item[0].count("."), item[0]))


def find_attention_outputs(model: nn.Module, grid: tuple[int, int, int], name: str = "model") -> list[nn.Module]:
    """Per decoder layer, the attention output projection (o_proj, c_proj, out_proj, dense): its input is the
    concatenated per-head attention output. Found by structure: inside an attention block, not an MLP."""
    from transformers.pytorch_utils import Conv1D

    layers_path, layers = find_decoder_layers(model, grid[0], name)
    width = grid[1] * grid[2]
    outputs = []
    for index, layer in enumerate(layers):
        found = []
        for path, module in layer.named_modules():
            parts = path.split(".")
            if parts[-1] not in _OUTPUT_PROJECTION_NAMES or not isinstance(module, (nn.Linear, Conv1D)):
                continue
            if any(part in ("mlp", "ffn", "feed_forward", "intermediate") for part in parts):
                continue
            if any("attn" in part or "attention" in part for part in parts[:-1]):
                found.append((path, module))
        if len(found) != 1:
            raise ModelError(
                f"{name}: layer {layers_path}.{index} has {len(found)} attention output projections "
                f"({[path for path, _ in found]}); expected exactly one"
            )
        path, module = found[0]
        in_width = module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]
        if in_width != width:
            raise ModelError(
                f"{name}: {layers_path}.{index}.{path} takes {in_width} inputs, but the config's grid gives "
                f"{grid[1]} heads x {grid[2]} head_dim = {width}"
            )
        outputs.append(module)
    return outputs


def _revision_of(config: Any, source: str, revision: str | None, gguf_file: str | None) -> str:
    """The exact revision: the hub commit when the model came from a hub, else a fingerprint of the local files."""
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return commit
    folder = Path(source)
    if folder.is_dir():
        return "sha256:" + folder_digest(folder, only=[gguf_file] if gguf_file else None)
    return revision or "unknown"


# A local folder's revision covers the files that decide what the model computes and how its inputs are made
# (docs/format.md, "Model revision"): weights, configs, tokenizer, processor and chat template. Files that do not
# (generation_config.json, README, licences, .gitattributes) are left out, and JSON files are hashed without the
# `transformers_version` key, which names the library that wrote them, not the model: re-saving a model with a newer
# transformers keeps its revision.
REVISION_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".json", ".jinja", ".model", ".txt", ".tiktoken")
REVISION_EXCLUDED = ("generation_config.json",)
WRITER_KEYS = ("transformers_version",)
_CANONICAL_JSON_MAX_BYTES = 64 << 20  # configs, tokenizers and weight indexes are far smaller


def revision_files(folder: Path) -> list[str]:
    """The names of the files a local folder's revision covers, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in REVISION_SUFFIXES and p.name not in REVISION_EXCLUDED
                  and not p.name.lower().startswith(("readme", "license", "licence", "notice")))


def folder_digest(folder: Path, only: list[str] | None = None) -> str:
    """sha256 over the revision files of a model folder: per file its name, then for JSON its content without writer
    keys, for other files their size and first and last MiB (not a full read of the weights)."""
    hasher = hashlib.sha256()
    for file_name in only or revision_files(folder):
        path = folder / file_name
        size = path.stat().st_size
        if path.suffix.lower() == ".json" and size <= _CANONICAL_JSON_MAX_BYTES:
            hasher.update(f"{file_name}:json:".encode())
            hasher.update(_canonical_json(path.read_bytes()))
            continue
        hasher.update(f"{file_name}:{size}".encode())
        with open(path, "rb") as handle:
            hasher.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), os.SEEK_END)
                hasher.update(handle.read())
    return hasher.hexdigest()


def _canonical_json(data: bytes) -> bytes:
    """The JSON document without writer keys, serialised canonically; bytes that are not JSON stay as they are."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return data
    if isinstance(value, dict):
        value = {key: item for key, item in value.items() if key not in WRITER_KEYS}
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

