"""Preprocessing from a bundle's spec: render the prompt, tokenise with `tokenizers`, prepare images with numpy/PIL.

The builder (savpack.preprocess_spec) writes preprocess.json and tokenizer.json from the model's own processor.
`Preprocessor.encode` returns exactly the tensors the builder's LoadedModel.encode gives the model (same names, dtypes,
values and padding side) without torch or transformers. docs/preprocessing.md describes every field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from . import format as fmt
from .compat import RUNTIME_PACKAGE, version_refusal
from .errors import InputError, InputSizeError, PreprocessSpecError
from .files import read_file
from .image_processing import Gemma3Images, Idefics3Images, LlavaImages, LlavaOnevisionImages, PixelSteps, Qwen2VLImages
from .images import to_rgb

SPEC_FILE = "preprocess.json"
TOKENIZER_FILE = "tokenizer.json"
SPEC_FORMAT = "savpack-preprocess"
SPEC_VERSION = 2  # 2: text.token_type_ids, text.position_ids_from_mask, text.mm_token_types_name; more families
SUPPORTED_SPEC_VERSIONS = (1, 2)
MAX_SPEC_BYTES = 16 * 1024 * 1024  # a spec is a few KiB; a tokenizer.json of a large vocabulary is ~10 MiB
MAX_TOKENIZER_BYTES = 256 * 1024 * 1024

# Family name (as the builder's families.py names it) -> the class of its `image` section; None: text only.
IMAGE_RULES: dict[str, type[PixelSteps] | None] = {
    "qwen2_vl": Qwen2VLImages,
    "qwen2_5_vl": Qwen2VLImages,  # Qwen2.5-VL's image processor is Qwen2-VL's
    "qwen3_vl": Qwen2VLImages,  # and Qwen3-VL's (patch 16)
    "llava_onevision": LlavaOnevisionImages,
    "llava": LlavaImages,
    "gemma3": Gemma3Images,
    "idefics3": Idefics3Images,
    "smolvlm": Idefics3Images,  # SmolVLM's image processor and prompt strings are Idefics3's
    "causal_lm": None,
    "gpt2": None,
    "bert": None,
}


@dataclass(frozen=True)
class RenderRule:
    """The rendered prompt for n images is `before_images + image * n + after_images`, with {text} then filled in."""

    before_images: str
    image: str
    after_images: str
    max_images: int | None  # None: any number of images; 0: text only
    min_images: int = 0  # (spec version 2) 1: the chat template renders a turn without images otherwise (Idefics3)

    def __post_init__(self) -> None:
        if self.max_images is not None and self.max_images < 0:
            raise ValueError("max_images: must be null or >= 0")
        if self.min_images not in (0, 1) or (self.max_images is not None and self.min_images > self.max_images):
            raise ValueError("min_images: must be 0 or 1, and at most max_images")

    def template(self, image_count: int) -> str:
        return self.before_images + self.image * image_count + self.after_images


@dataclass(frozen=True)
class TextRule:
    """How rendered prompts become token ids."""

    add_special_tokens: bool  # whether the tokenizer adds its own special tokens (BOS) around each prompt
    pad_id: int
    padding_side: str  # "left" or "right"
    max_positions: int | None  # the model's context length, if it has one
    mm_token_types: tuple[tuple[int, int], ...] | None  # (token id, type) for `mm_token_type_ids`; None: no such input
    # Fields added in spec version 2 (a version-1 spec reads with these defaults):
    mm_token_types_name: str = "mm_token_type_ids"  # the input name of those types (Gemma 3: token_type_ids)
    token_type_ids: bool = False  # return the tokenizer's segment ids as `token_type_ids` (BERT), 0 on padding
    position_ids_from_mask: bool = False  # return `position_ids` counted over real tokens only (GPT-2)

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError("padding_side: must be 'left' or 'right'")
        if self.pad_id < 0:
            raise ValueError("pad_id: must be >= 0")


@dataclass
class Preprocessor:
    """Turns (text, images) items into the model inputs of one family, as the builder computes them."""

    family: str
    prompt: dict[str, Any]  # the pack's prompt: template, rendered, image_count, chat_template_sha256
    render_rule: RenderRule
    text: TextRule
    images: PixelSteps | None  # the family's image rule; None for text-only families
    tokenizer: Tokenizer

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Preprocessor:
        """Read preprocess.json and tokenizer.json from a bundle folder."""
        folder = Path(folder)
        path = folder / SPEC_FILE
        spec = _read_json(path)
        return cls.from_spec(spec, _read_tokenizer(folder / TOKENIZER_FILE), where=path)

    @classmethod
    def from_spec(cls, spec: Any, tokenizer: Tokenizer, where: object = SPEC_FILE) -> Preprocessor:
        """Validate a spec (as a parsed JSON object) against its tokenizer; every error names the field at fault."""
        if not isinstance(spec, dict):
            raise PreprocessSpecError(f"{where}: must be a JSON object, got {type(spec).__name__}")
        _check_version(spec, where)
        family = _field(spec, "family", where)
        if family not in IMAGE_RULES:
            raise PreprocessSpecError(f"{where}: family {family!r} is not one this runtime knows ({sorted(IMAGE_RULES)})")
        prompt = _field(spec, "prompt", where)
        if not isinstance(prompt, dict) or any(name not in prompt for name in fmt.PROMPT_FIELDS):
            raise PreprocessSpecError(f"{where}: prompt must be an object with fields {list(fmt.PROMPT_FIELDS)}")
        render_rule = parse_fields(RenderRule, _field(spec, "render", where), f"{where}: render")
        text = parse_fields(TextRule, _field(spec, "text", where), f"{where}: text")
        rule_class, image_values = IMAGE_RULES[family], _field(spec, "image", where)
        if (rule_class is None) != (image_values is None):
            raise PreprocessSpecError(f"{where}: image must be {'null' if rule_class is None else 'an object'} for family {family}")
        images = parse_fields(rule_class, image_values, f"{where}: image") if rule_class is not None else None
        preprocessor = cls(family, prompt, render_rule, text, images, tokenizer)
        preprocessor._check_consistent(where)
        return preprocessor

    def _check_consistent(self, where: object) -> None:
        count = self.prompt["image_count"]
        if not isinstance(count, int) or self.render_rule.template(count) != self.prompt["rendered"]:
            raise PreprocessSpecError(f"{where}: render does not reproduce prompt.rendered for {count!r} image(s)")
        vocabulary = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if self.text.pad_id >= vocabulary:
            raise PreprocessSpecError(f"{where}: text.pad_id {self.text.pad_id} is outside the tokenizer's {vocabulary} tokens")
        if self.images is None:
            return
        token, token_id = self.images.image_token, self.images.image_token_id
        for field, (name, number) in (("image_token", (token, token_id)), ("feature_token", self.images.feature_token)):
            if self.tokenizer.token_to_id(name) != number:
                raise PreprocessSpecError(
                    f"{where}: image {field} {name!r} is id {self.tokenizer.token_to_id(name)} in {TOKENIZER_FILE}, "
                    f"not {number}"
                )
        rule = self.render_rule
        if token in rule.before_images or token in rule.after_images or (rule.max_images != 0 and rule.image.count(token) != 1):
            raise PreprocessSpecError(f"{where}: the image token {token!r} must stand once in render.image and nowhere else")

    def render(self, text: str, image_count: int) -> str:
        """The full prompt string for one item, as the builder renders it (chat template included)."""
        if not isinstance(text, str):
            raise InputError(f"text must be a string, got {type(text).__name__}")
        least, limit = self.render_rule.min_images, self.render_rule.max_images
        if image_count < least or (limit is not None and image_count > limit):
            allowed = "no images" if limit == 0 else f"at most {limit} images" if limit is not None else f"at least {least} image"
            raise InputError(f"the {self.family} prompt takes {allowed}, got {image_count}")
        return self.render_rule.template(image_count).replace(fmt.TEXT_PLACEHOLDER, text)

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Text tokens of each rendered prompt, image placeholders not expanded: the key batches are ordered by, as
        the builder counts them (its tokenizer, no special tokens)."""
        return [len(encoding.ids) for encoding in self.tokenizer.encode_batch(prompts, add_special_tokens=False)]

    def encode(self, prompts: list[str], images: list[list[Image.Image]] | None = None) -> dict[str, np.ndarray]:
        """Rendered prompts and their images -> the family's model inputs, padded to the longest prompt.

        Ids and masks are int64; pixel values float32 (family layout, see image_processing). Every item must carry
        images, or none must (as in the builder).
        """
        if not prompts:
            raise InputError("nothing to encode: the batch is empty")
        images = [[] for _ in prompts] if images is None else images
        if len(images) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(images)} image lists")
        with_images = [bool(item) for item in images]
        if any(with_images) and self.images is None:
            raise InputError(f"the {self.family} family is text only; items cannot carry images")
        if any(with_images) and not all(with_images):
            raise InputError("a batch mixes items with and without images; give every item an image or none")

        inputs: dict[str, np.ndarray] = {}
        expanded = list(prompts)
        if any(with_images):
            for index, item in enumerate(images):
                if not all(isinstance(image, Image.Image) for image in item):
                    raise InputError(f"item {index}: images must be PIL images (open files with savpack_runtime.images.load_image)")
            rgb = [[to_rgb(image) for image in item] for item in images]
            inputs, image_texts = self.images.process(rgb)
            expanded = self._expand_placeholders(prompts, [len(item) for item in images], image_texts)
        elif self.images is not None:
            self._expand_placeholders(prompts, [0] * len(prompts), [])  # refuses placeholders without images

        encodings = self.tokenizer.encode_batch(expanded, add_special_tokens=self.text.add_special_tokens)
        rows = [encoding.ids for encoding in encodings]
        limit = self.text.max_positions
        for index, row in enumerate(rows):
            if limit is not None and len(row) > limit:
                raise InputSizeError(f"item {index}: prompt is {len(row)} tokens, longer than the model's context of {limit}")
        input_ids, attention_mask = pad_rows(rows, self.text.pad_id, self.text.padding_side)
        encoded = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.text.token_type_ids:
            encoded["token_type_ids"] = pad_rows([encoding.type_ids for encoding in encodings], 0, self.text.padding_side)[0]
        if self.text.mm_token_types is not None:
            types_of = np.zeros_like(input_ids)
            for token_id, kind in self.text.mm_token_types:
                types_of[input_ids == token_id] = kind
            encoded[self.text.mm_token_types_name] = types_of
        if self.text.position_ids_from_mask:
            # Real tokens count 0, 1, 2, ... whatever padding precedes them (learned absolute positions).
            encoded["position_ids"] = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
        if self.images is not None and any(with_images):
            feature, feature_id = self.images.feature_token
            expected = sum(text.count(feature) for text in image_texts)
            found = int((input_ids == feature_id).sum())
            if found != expected:
                raise PreprocessSpecError(
                    f"{TOKENIZER_FILE}: {expected} image tokens were placed but {found} came out of tokenisation; "
                    "the tokenizer does not keep the image token whole"
                )
        return {**encoded, **inputs}

    def _expand_placeholders(self, prompts: list[str], counts: list[int], image_texts: list[str]) -> list[str]:
        """Each image placeholder becomes its image's text (image tokens, as many as the image has features, and the
        family's markers), in order."""
        token = self.images.image_token
        expanded, position = [], 0
        for index, (prompt, count) in enumerate(zip(prompts, counts)):
            pieces = prompt.split(token)
            if len(pieces) - 1 != count:
                raise InputError(
                    f"item {index}: the prompt holds {len(pieces) - 1} image placeholder(s) {token!r} but {count} "
                    "image(s) were given (does the text contain the placeholder?)"
                )
            text = pieces[0]
            for piece, image_text in zip(pieces[1:], image_texts[position : position + count]):
                text += image_text + piece
            expanded.append(text)
            position += count
        return expanded


def pad_rows(rows: list[list[int]], pad_id: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> (input_ids, attention_mask), both (batch, longest) int64, padded on `side`."""
    length = max(len(row) for row in rows)
    input_ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), length), dtype=np.int64)
    for index, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        input_ids[index, span] = row
        attention_mask[index, span] = 1
    return input_ids, attention_mask


def parse_fields(cls: type, values: Any, where: str) -> Any:
    """Build the dataclass `cls` from a JSON object: every field present, of its declared type, nothing unknown."""
    if not isinstance(values, dict):
        raise PreprocessSpecError(f"{where}: must be a JSON object, got {type(values).__name__}")
    names = [item.name for item in fields(cls)]
    optional = {item.name for item in fields(cls) if item.default is not dataclasses.MISSING}
    missing = [name for name in names if name not in values and name not in optional]
    unknown = sorted(set(values) - set(names))
    if missing or unknown:
        problems = ([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else [])
        raise PreprocessSpecError(f"{where}: {', '.join(problems)} (fields: {names})")
    hints = typing.get_type_hints(cls)
    arguments = {name: _typed(values[name], hints[name], f"{where}.{name}") for name in names if name in values}
    try:
        return cls(**arguments)
    except ValueError as exc:
        raise PreprocessSpecError(f"{where}.{exc}") from None


def _typed(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against a field's type: JSON lists become tuples, ints are accepted as floats."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        return _typed(value, next(argument for argument in arguments if argument is not type(None)), where)
    if origin is tuple:
        if not isinstance(value, list):
            raise PreprocessSpecError(f"{where}: expected a list, got {value!r:.80}")
        if arguments[-1] is Ellipsis:
            return tuple(_typed(item, arguments[0], f"{where}[{i}]") for i, item in enumerate(value))
        if len(value) != len(arguments):
            raise PreprocessSpecError(f"{where}: expected {len(arguments)} values, got {len(value)}")
        return tuple(_typed(item, kind, f"{where}[{i}]") for i, (item, kind) in enumerate(zip(value, arguments)))
    accepted = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[hint]
    if not isinstance(value, accepted) or (hint is not bool and isinstance(value, bool)):
        raise PreprocessSpecError(f"{where}: expected {hint.__name__}, got {value!r:.80}")
    return float(value) if hint is float else value


def _field(spec: dict[str, Any], name: str, where: object) -> Any:
    if name not in spec:
        raise PreprocessSpecError(f"{where}: required field {name!r} is missing")
    return spec[name]


def _check_version(spec: dict[str, Any], where: object) -> None:
    if spec.get("format") != SPEC_FORMAT:
        raise PreprocessSpecError(f"{where}: format is {spec.get('format')!r}, expected {SPEC_FORMAT!r}")
    version = _field(spec, "format_version", where)
    if not isinstance(version, int) or isinstance(version, bool):
        raise PreprocessSpecError(f"{where}: format_version must be an integer, got {version!r}")
    refusal = version_refusal(version, SUPPORTED_SPEC_VERSIONS, "format_version", RUNTIME_PACKAGE)
    if refusal:
        raise PreprocessSpecError(f"{where}: {refusal}")


def _read_json(path: Path) -> Any:
    data = _read_bytes(path, MAX_SPEC_BYTES)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PreprocessSpecError(f"{path}: not valid JSON: {exc}") from None


def _read_tokenizer(path: Path) -> Tokenizer:
    data = _read_bytes(path, MAX_TOKENIZER_BYTES)
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises plain Exception for every parse failure
        raise PreprocessSpecError(f"{path}: not a tokenizer file the tokenizers library can read: {exc}") from None


def _read_bytes(path: Path, limit: int) -> bytes:
    if not os.path.lexists(path):
        raise PreprocessSpecError(f"{path}: file does not exist (is this a savpack bundle folder?)")
    return read_file(path, limit, PreprocessSpecError)
