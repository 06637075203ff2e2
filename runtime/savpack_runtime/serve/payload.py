"""The body of POST /v1/classify, read and checked before any work is queued.

JSON: {"inputs": [{"text": "...", "images": ["<base64 or data: URL>"]} | "text", ...], "packs": [...], "abstain_below": P}
multipart/form-data: one item from the fields `text` and `images` (files, or base64 strings), plus `packs` (repeated)
and `abstain_below`. Every mistake is an ApiError with its HTTP status and a message naming the field at fault.
Images are only base64-decoded here; their headers are checked and their pixels decoded by savpack_runtime.images.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

# HTTP statuses and the error_type the body names (as text-embeddings-inference: a word a client can branch on).
VALIDATION, TOO_LARGE, OVERLOADED = (422, "validation"), (413, "too_large"), (429, "overloaded")
MEDIA_TYPE, NOT_FOUND, UNAVAILABLE, INTERNAL = (415, "unsupported_media_type"), (404, "not_found"), (503, "unavailable"), (500, "internal")
DISCONNECTED = (400, "disconnected")  # the client hung up mid-body; nobody reads the answer

REQUEST_FIELDS = ("inputs", "packs", "abstain_below")
ITEM_FIELDS = ("text", "images")
FORM_FIELDS = ("text", "images", "packs", "abstain_below")
_DATA_URL = re.compile(r"data:(?P<media>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL)


class ApiError(Exception):
    def __init__(self, kind: tuple[int, str], message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.error_type = kind
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 * 1024 * 1024
    max_inputs: int = 32  # items per request
    max_images: int = 8  # images per item
    max_image_pixels: int = 4096 * 4096  # per image, read from its header before decoding
    request_pixel_images: int = 4  # a request's images together hold at most this many max-size images' pixels

    @property
    def max_request_pixels(self) -> int:
        return self.max_image_pixels * self.request_pixel_images


@dataclass
class ClassifyRequest:
    items: list[dict[str, Any]]  # {"text": str, "images": [bytes, ...]}, images still encoded (PNG, JPEG, ...)
    image_names: list[list[str]]  # the field each image came in, for messages: inputs[0].images[1]
    packs: list[str] | None = None
    abstain_below: float | None = None


def parse_json(body: bytes, limits: Limits, pack_names: Sequence[str]) -> ClassifyRequest:
    try:
        payload = json.loads(body, parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise ApiError(VALIDATION, f"request body is not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ApiError(VALIDATION, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(VALIDATION, f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ApiError(VALIDATION, f"request body must be a JSON object with 'inputs', got {_kind(payload)}")
    unknown = sorted(set(payload) - set(REQUEST_FIELDS))
    if unknown:
        raise ApiError(VALIDATION, f"unknown field(s) {unknown}; a request has {list(REQUEST_FIELDS)}")
    if "inputs" not in payload:
        raise ApiError(VALIDATION, "inputs: required (a list of items: {\"text\": ..., \"images\": [...]} or strings)")
    inputs = payload["inputs"]
    if not isinstance(inputs, list):
        raise ApiError(VALIDATION, f"inputs: must be a list of items, got {_kind(inputs)}")
    if not inputs:
        raise ApiError(VALIDATION, "inputs: empty; give at least one item")
    if len(inputs) > limits.max_inputs:
        raise ApiError(TOO_LARGE, f"inputs: {len(inputs)} items, more than this server's limit of {limits.max_inputs} per request")
    items, names = [], []
    for index, value in enumerate(inputs):
        where = f"inputs[{index}]"
        if isinstance(value, str):
            value = {"text": value}
        if not isinstance(value, dict):
            raise ApiError(VALIDATION, f"{where}: must be an object with text and images, or a string; got {_kind(value)}")
        unknown = sorted(set(value) - set(ITEM_FIELDS))
        if unknown:
            raise ApiError(VALIDATION, f"{where}: unknown field(s) {unknown}; an item has {list(ITEM_FIELDS)}")
        text = value.get("text", "")
        if not isinstance(text, str):
            raise ApiError(VALIDATION, f"{where}.text: must be a string, got {_kind(text)}")
        images = value.get("images", [])
        if not isinstance(images, list):
            raise ApiError(VALIDATION, f"{where}.images: must be a list of base64 strings or data: URLs, got {_kind(images)}")
        _check_image_count(len(images), f"{where}.images", limits)
        image_names = [f"{where}.images[{number}]" for number in range(len(images))]
        items.append({"text": text, "images": [decode_image_string(image, name) for image, name in zip(images, image_names)]})
        names.append(image_names)
    return ClassifyRequest(items, names, _packs(payload.get("packs"), pack_names), _abstain_below(payload.get("abstain_below")))


async def parse_form(form: Any, limits: Limits, pack_names: Sequence[str]) -> ClassifyRequest:
    """One item from a multipart form (starlette FormData): text, images (files or base64 strings), packs, abstain_below."""
    unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
    if unknown:
        raise ApiError(VALIDATION, f"unknown form field(s) {unknown}; a multipart request has {list(FORM_FIELDS)}")
    texts = form.getlist("text")
    if len(texts) > 1:
        raise ApiError(VALIDATION, "text: given more than once; a multipart request classifies one item")
    text = texts[0] if texts else ""
    if not isinstance(text, str):
        raise ApiError(VALIDATION, "text: must be a form field, not a file")
    uploads = form.getlist("images")
    _check_image_count(len(uploads), "images", limits)
    images, names = [], []
    for number, upload in enumerate(uploads):
        name = f"images[{number}]" + (f" ({upload.filename})" if getattr(upload, "filename", None) else "")
        images.append(decode_image_string(upload, name) if isinstance(upload, str) else await upload.read())
        names.append(name)
    packs = form.getlist("packs") or None
    if packs is not None and not all(isinstance(pack, str) for pack in packs):
        raise ApiError(VALIDATION, "packs: must be form fields naming packs, not files")
    abstain_below = form.get("abstain_below")
    if abstain_below is not None:
        try:
            abstain_below = float(abstain_below) if isinstance(abstain_below, str) else abstain_below
        except ValueError:
            raise ApiError(VALIDATION, f"abstain_below: must be a number between 0 and 1, got {abstain_below!r}") from None
    return ClassifyRequest([{"text": text, "images": images}], [names], _packs(packs, pack_names), _abstain_below(abstain_below))


def decode_image_string(value: Any, where: str) -> bytes:
    """A base64 string or a data: URL (data:image/png;base64,...) -> the image file's bytes."""
    if not isinstance(value, str):
        raise ApiError(VALIDATION, f"{where}: must be a base64 string or a data: URL, got {_kind(value)}")
    data = value
    if value.startswith("data:"):
        match = _DATA_URL.fullmatch(value)
        if match is None or not match["params"].endswith(";base64"):
            raise ApiError(VALIDATION, f"{where}: a data: URL must be data:<media type>;base64,<data>")
        if match["media"] and not match["media"].startswith("image/"):
            raise ApiError(VALIDATION, f"{where}: the data: URL holds {match['media']!r}, not an image")
        data = match["data"]
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(VALIDATION, f"{where}: not valid base64 ({exc})") from None


def _check_image_count(count: int, where: str, limits: Limits) -> None:
    if count > limits.max_images:
        raise ApiError(TOO_LARGE, f"{where}: {count} images, more than this server's limit of {limits.max_images} per item")


def _packs(value: Any, pack_names: Sequence[str]) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise ApiError(VALIDATION, f"packs: must be a list of pack names, got {_kind(value)}")
    if not value:
        raise ApiError(VALIDATION, f"packs: empty; name at least one of {list(pack_names)} or leave packs out")
    unknown = [name for name in value if name not in pack_names]
    if unknown:
        raise ApiError(VALIDATION, f"packs: unknown pack(s) {unknown}; this bundle holds {list(pack_names)}")
    if len(set(value)) != len(value):
        raise ApiError(VALIDATION, f"packs: {value} names a pack twice")
    return value


def _abstain_below(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ApiError(VALIDATION, f"abstain_below: must be a number between 0 and 1, got {value!r}")
    return float(value)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)
