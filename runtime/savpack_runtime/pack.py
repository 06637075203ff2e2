"""Read, validate and write SAV packs (numpy arrays in, file out).

Reading validates in a fixed order before anything is trusted: size, header, format version, required keys, types,
shapes, values. Each failure raises its own error type (savpack_runtime.errors) naming the key at fault.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import files
from . import format as fmt
from .compat import RUNTIME_PACKAGE, version_refusal
from . import prompt as prompt_fields
from .scoring import Scoring
from .errors import (
    PackMissingKeyError,
    PackShapeError,
    PackTypeError,
    PackValueError,
    PackVersionError,
    SavpackWarning,
)


@dataclass
class Pack:
    """A SAV classifier: which heads vote and the class centroids each head compares against."""

    heads: np.ndarray  # (k, 2) int32: (layer, head)
    centroids: np.ndarray  # (k, C, head_dim) float32
    head_scores: np.ndarray  # (k,) float32
    class_counts: np.ndarray  # (C,) int32
    all_head_scores: np.ndarray  # (layers, heads) float32
    labels: tuple[str, ...]
    model: dict[str, Any]  # id, revision, family, grid, fingerprint
    prompt: dict[str, Any]  # template, rendered, image_count, chat_template_sha256
    selection: dict[str, Any]  # k, scoring, ...
    metrics: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    version: str | None = None
    created_by: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    # The scoring model (format 2): classifier, temperature, sharpness, fitted_on; None in a format-1 pack, whose
    # probabilities are the vote shares. probe_weight (C, k * head_dim) and probe_bias (C,) when classifier is "probe".
    scoring: dict[str, Any] | None = None
    probe_weight: np.ndarray | None = None
    probe_bias: np.ndarray | None = None

    @property
    def format_version(self) -> int:
        """2 for a pack with a scoring model, 1 without (the format before calibration, still read and written)."""
        return fmt.FORMAT_VERSION if self.scoring else 1

    @property
    def scoring_model(self) -> Scoring | None:
        """The scoring model as savpack_runtime.scoring uses it; None for a format-1 pack."""
        return Scoring.from_record(self.scoring, self.probe_weight, self.probe_bias)

    @property
    def classifier(self) -> str:
        """Which rule gives the label: "vote" (the heads' vote) or "probe" (the linear head)."""
        return self.scoring["classifier"] if self.scoring else "vote"

    @property
    def k(self) -> int:
        return int(self.heads.shape[0])

    @property
    def grid(self) -> tuple[int, int, int]:
        layers, heads, head_dim = self.model["grid"]
        return int(layers), int(heads), int(head_dim)

    @property
    def token_position(self) -> str:
        """Which token's head outputs the pack uses: "last" (decoders) or "first" (an encoder's [CLS])."""
        return prompt_fields.token_position(self.prompt)

    @property
    def video_frames(self) -> int:
        """Frames sampled from each video item, as when the pack was built."""
        return prompt_fields.video_frames(self.prompt)

    @property
    def deepest_layer(self) -> int:
        return int(self.heads[:, 0].max())

    # -- writing -------------------------------------------------------------------------------------------------

    def to_tensors_and_metadata(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        tensors = {
            fmt.HEADS: np.asarray(self.heads, dtype=np.int32),
            fmt.CENTROIDS: np.asarray(self.centroids, dtype=np.float32),
            fmt.HEAD_SCORES: np.asarray(self.head_scores, dtype=np.float32),
            fmt.CLASS_COUNTS: np.asarray(self.class_counts, dtype=np.int32),
            fmt.ALL_HEAD_SCORES: np.asarray(self.all_head_scores, dtype=np.float32),
        }
        if self.probe_weight is not None:
            tensors[fmt.PROBE_WEIGHT] = np.asarray(self.probe_weight, dtype=np.float32)
            tensors[fmt.PROBE_BIAS] = np.asarray(self.probe_bias, dtype=np.float32)
        values: dict[str, Any] = {
            fmt.META_FORMAT: fmt.FORMAT_NAME,
            fmt.META_FORMAT_VERSION: str(self.format_version),
            fmt.META_LABELS: list(self.labels),
            fmt.META_MODEL: self.model,
            fmt.META_PROMPT: self.prompt,
            fmt.META_SELECTION: self.selection,
            fmt.META_METRICS: self.metrics,
            fmt.META_NAME: self.name,
            fmt.META_VERSION: self.version,
            fmt.META_CREATED_BY: self.created_by,
            fmt.META_DATASET: self.dataset,
            fmt.META_SCORING: self.scoring,
        }
        metadata = {}
        for key, value in values.items():
            if value is None or (key in fmt.OPTIONAL_META and value == {}):
                continue
            metadata[key] = _dump_json(value) if key in fmt.JSON_META else value
        return tensors, metadata

    def to_bytes(self) -> bytes:
        tensors, metadata = self.to_tensors_and_metadata()
        data = files.dumps(tensors, metadata)
        Pack.from_bytes(data, path="<pack being written>")  # never write what the reader would refuse
        return data

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write atomically; refuses to replace an existing file unless `force`."""
        data = self.to_bytes()
        return files.atomic_write(path, lambda handle: handle.write(data), force)

    def content_hash(self) -> str:
        """sha256 of the bytes `save` writes: the pack's content hash (docs/format.md, "Content hash").

        Writing is canonical, so for a file savpack wrote this equals the sha256 of the file; a registry records the
        file's sha256 and `savpack verify` compares against that.
        """
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def replace(self, **changes: Any) -> "Pack":
        return dataclasses.replace(self, **changes)

    # -- reading -------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Pack":
        tensors, metadata = files.read(path)
        return cls._from_parts(tensors, metadata, path)

    @classmethod
    def from_bytes(cls, data: bytes, path: object = None) -> "Pack":
        tensors, metadata = files.loads(data, path)
        return cls._from_parts(tensors, metadata, path)

    @classmethod
    def _from_parts(cls, tensors: dict[str, np.ndarray], metadata: dict[str, str], path: object) -> "Pack":
        """Validate parsed tensors and metadata, then trust them. Rows 1-6 of docs/format.md section 4 (the byte
        layout) are files.loads'; rows 7-15 are VALIDATION_ROWS, run here in the table's order."""
        reading = _Reading(tensors, metadata, path)
        for _, check in VALIDATION_ROWS:
            check(reading)
        values, optional = reading.values, {key: reading.values.get(key, {}) for key in _OPTIONAL_OBJECTS}
        return cls(
            heads=tensors[fmt.HEADS], centroids=tensors[fmt.CENTROIDS], head_scores=tensors[fmt.HEAD_SCORES],
            class_counts=tensors[fmt.CLASS_COUNTS], all_head_scores=tensors[fmt.ALL_HEAD_SCORES],
            labels=tuple(values[fmt.META_LABELS]), model=values[fmt.META_MODEL], prompt=values[fmt.META_PROMPT],
            selection=values[fmt.META_SELECTION], metrics=optional[fmt.META_METRICS], name=metadata.get(fmt.META_NAME),
            version=metadata.get(fmt.META_VERSION), created_by=optional[fmt.META_CREATED_BY],
            dataset=optional[fmt.META_DATASET], scoring=values.get(fmt.META_SCORING),
            probe_weight=tensors.get(fmt.PROBE_WEIGHT), probe_bias=tensors.get(fmt.PROBE_BIAS),
        )


# -- validation, row by row as docs/format.md section 4 lists it ----------------------------------------------------

_OPTIONAL_OBJECTS = (fmt.META_METRICS, fmt.META_CREATED_BY, fmt.META_DATASET)


@dataclass
class _Reading:
    """What the rows have established so far about one pack being read."""

    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]
    path: object
    version: int = 0  # row 8
    values: dict[str, Any] = field(default_factory=dict)  # row 11: parsed JSON metadata by key


def _check_format_name(reading: _Reading) -> None:
    """Row 7: `savpack.format` is `savpack` (absent: not a SAV pack)."""
    metadata, path = reading.metadata, reading.path
    if fmt.META_FORMAT not in metadata:
        raise PackMissingKeyError(f"required metadata key {fmt.META_FORMAT!r} is missing: not a SAV pack", path, fmt.META_FORMAT)
    if metadata[fmt.META_FORMAT] != fmt.FORMAT_NAME:
        raise PackValueError(f"{fmt.META_FORMAT} is {metadata[fmt.META_FORMAT]!r}, expected {fmt.FORMAT_NAME!r}", path, fmt.META_FORMAT)


def _check_format_version(reading: _Reading) -> None:
    """Row 8: `savpack.format_version` is present, decimal digits, and a version this reader supports."""
    raw, path = reading.metadata.get(fmt.META_FORMAT_VERSION), reading.path
    if raw is None:
        raise PackMissingKeyError(f"required metadata key {fmt.META_FORMAT_VERSION!r} is missing", path, fmt.META_FORMAT_VERSION)
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise PackTypeError(f"{fmt.META_FORMAT_VERSION} is {raw!r}, expected a decimal integer", path, fmt.META_FORMAT_VERSION)
    refusal = version_refusal(int(raw), fmt.SUPPORTED_VERSIONS, "pack format version", RUNTIME_PACKAGE)
    if refusal:
        raise PackVersionError(refusal, path, fmt.META_FORMAT_VERSION)
    reading.version = int(raw)


def _check_required_keys(reading: _Reading) -> None:
    """Row 9: the required tensors and metadata keys are present (from format 2: `savpack.scoring`, and the probe's
    tensors when its classifier is "probe")."""
    for name in fmt.REQUIRED_TENSORS:
        if name not in reading.tensors:
            raise PackMissingKeyError(f"required tensor {name!r} is missing", reading.path, name)
    for key in _required_meta(reading.version):
        if key not in reading.metadata:
            raise PackMissingKeyError(f"required metadata key {key!r} is missing", reading.path, key)


def _warn_unknown_keys(reading: _Reading) -> None:
    """Row 10: unknown tensors or `savpack.*` keys give one warning listing them all; reading continues."""
    known = set(_required_meta(reading.version)) | set(fmt.OPTIONAL_META)
    known_tensors = set(fmt.REQUIRED_TENSORS) | (set(fmt.PROBE_TENSORS) if reading.version >= 2 else set())
    unknown = sorted(set(reading.tensors) - known_tensors) + sorted(set(reading.metadata) - known)
    for key in unknown:  # ignored means ignored: a format-1 reading must not pick up format-2 keys
        reading.tensors.pop(key, None)
        reading.metadata.pop(key, None)
    if unknown:
        warnings.warn(f"{reading.path}: ignoring unknown pack keys {unknown} (written by a newer savpack?)", SavpackWarning, stacklevel=4)


def _parse_json_values(reading: _Reading) -> None:
    """Row 11: JSON values parse (no NaN/Infinity); labels are strings; the objects have their required fields."""
    path = reading.path
    values = {key: _load_json(reading.metadata, key, path) for key in fmt.JSON_META if key in reading.metadata}
    labels = values[fmt.META_LABELS]
    if not (isinstance(labels, list) and all(isinstance(label, str) for label in labels)):
        raise PackTypeError(f"{fmt.META_LABELS} must be a JSON list of strings", path, fmt.META_LABELS)
    required = {fmt.META_MODEL: fmt.MODEL_FIELDS, fmt.META_PROMPT: fmt.PROMPT_FIELDS, fmt.META_SELECTION: (),
                fmt.META_SCORING: fmt.SCORING_FIELDS}
    for key in (*required, *_OPTIONAL_OBJECTS):
        if key in values:
            _check_object(values, key, required.get(key, ()), path)
    reading.values = values


def _check_metadata_values(reading: _Reading) -> None:
    """Row 12: grid, model id and family, prompt fields (token_position, video_frames), name and version."""
    model, prompt, path = reading.values[fmt.META_MODEL], reading.values[fmt.META_PROMPT], reading.path
    grid = model["grid"]
    if not (isinstance(grid, list) and len(grid) == 3 and all(type(n) is int and n > 0 for n in grid)):
        raise PackTypeError(f"{fmt.META_MODEL} grid must be [layers, heads, head_dim] of positive integers, got {grid!r}", path, fmt.META_MODEL)
    for key in ("id", "family"):
        if not isinstance(model[key], str) or not model[key]:
            raise PackTypeError(f"{fmt.META_MODEL} {key} must be a non-empty string", path, fmt.META_MODEL)
    for key in ("template", "rendered"):
        if not isinstance(prompt[key], str):
            raise PackTypeError(f"{fmt.META_PROMPT} {key} must be a string", path, fmt.META_PROMPT)
    if type(prompt["image_count"]) is not int or prompt["image_count"] < 0:
        raise PackTypeError(f"{fmt.META_PROMPT} image_count must be a non-negative integer", path, fmt.META_PROMPT)
    if prompt_fields.token_position(prompt) not in fmt.TOKEN_POSITIONS:
        raise PackValueError(f"{fmt.META_PROMPT} {fmt.PROMPT_TOKEN_POSITION} is {prompt[fmt.PROMPT_TOKEN_POSITION]!r}, "
                             f"expected one of {list(fmt.TOKEN_POSITIONS)}", path, fmt.META_PROMPT)
    frames = prompt.get(fmt.PROMPT_VIDEO_FRAMES)
    if frames is not None and (type(frames) is not int or not 1 <= frames <= fmt.MAX_VIDEO_FRAMES):
        raise PackTypeError(f"{fmt.META_PROMPT} {fmt.PROMPT_VIDEO_FRAMES} must be a whole number from 1 to "
                            f"{fmt.MAX_VIDEO_FRAMES}, got {frames!r}", path, fmt.META_PROMPT)
    for key in (fmt.META_NAME, fmt.META_VERSION):
        if key in reading.metadata and not reading.metadata[key]:
            raise PackValueError(f"{key} is empty", path, key)
    if fmt.META_SCORING in reading.values:
        _check_scoring(reading.values[fmt.META_SCORING], reading.tensors, path)


def _check_scoring(scoring: dict[str, Any], tensors: dict[str, np.ndarray], path: object) -> None:
    """Row 12, format 2: the scoring model's fields, and the probe's tensors present exactly for a probe."""
    key = fmt.META_SCORING
    if scoring["classifier"] not in fmt.CLASSIFIERS:
        raise PackValueError(f"{key} classifier is {scoring['classifier']!r}, expected one of {list(fmt.CLASSIFIERS)}", path, key)
    if scoring["fitted_on"] not in fmt.FITTED_ON:
        raise PackValueError(f"{key} fitted_on is {scoring['fitted_on']!r}, expected one of {list(fmt.FITTED_ON)}", path, key)
    for name in ("temperature", "sharpness"):
        value = scoring[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
            raise PackValueError(f"{key} {name} must be a positive number below 1e6, got {value!r}", path, key)
    probe = scoring["classifier"] == "probe"
    for name in fmt.PROBE_TENSORS:
        if probe and name not in tensors:
            raise PackMissingKeyError(f"required tensor {name!r} is missing (the scoring classifier is 'probe')", path, name)
        if not probe and name in tensors:
            raise PackValueError(f"tensor {name!r} is present but the scoring classifier is {scoring['classifier']!r}", path, name)

def _check_tensor_types(reading: _Reading) -> None:
    """Row 13: tensor dtypes and ranks as in section 2."""
    for name, (code, rank) in fmt.TENSOR_TYPES.items():
        if name not in reading.tensors:  # an optional tensor, absent (row 12 checked which must be there)
            continue
        tensor, dtype = reading.tensors[name], np.dtype(fmt.DTYPES[code])
        if tensor.dtype != dtype:
            raise PackTypeError(f"tensor {name!r} is {tensor.dtype}, expected {dtype}", reading.path, name)
        if tensor.ndim != rank:
            raise PackTypeError(f"tensor {name!r} has rank {tensor.ndim}, expected {rank}", reading.path, name)


def _check_shapes(reading: _Reading) -> None:
    """Row 14: shapes agree with each other, with the labels and with the model grid."""
    tensors, path = reading.tensors, reading.path
    heads, labels = tensors[fmt.HEADS], reading.values[fmt.META_LABELS]
    k, classes, head_dim = tensors[fmt.CENTROIDS].shape
    layers, num_heads, grid_head_dim = reading.values[fmt.META_MODEL]["grid"]
    if heads.shape != (k, 2) or k == 0:
        raise PackShapeError(f"tensor 'heads' has shape {list(heads.shape)}, expected [{k}, 2] with k >= 1 (k from 'centroids')", path, fmt.HEADS)
    if tensors[fmt.HEAD_SCORES].shape != (k,):
        raise PackShapeError(f"tensor 'head_scores' has shape {list(tensors[fmt.HEAD_SCORES].shape)}, expected [{k}]", path, fmt.HEAD_SCORES)
    if len(labels) != classes:
        raise PackShapeError(f"{fmt.META_LABELS} has {len(labels)} labels but 'centroids' has {classes} classes", path, fmt.META_LABELS)
    if tensors[fmt.CLASS_COUNTS].shape != (classes,):
        raise PackShapeError(f"tensor 'class_counts' has shape {list(tensors[fmt.CLASS_COUNTS].shape)}, expected [{classes}]", path, fmt.CLASS_COUNTS)
    if head_dim != grid_head_dim:
        raise PackShapeError(f"'centroids' head_dim {head_dim} differs from the model grid's {grid_head_dim}", path, fmt.CENTROIDS)
    if tensors[fmt.ALL_HEAD_SCORES].shape != (layers, num_heads):
        raise PackShapeError(f"tensor 'all_head_scores' has shape {list(tensors[fmt.ALL_HEAD_SCORES].shape)}, expected the grid's [{layers}, {num_heads}]", path, fmt.ALL_HEAD_SCORES)
    expected = {fmt.PROBE_WEIGHT: ((classes, k * head_dim), "classes, k * head_dim"), fmt.PROBE_BIAS: ((classes,), "classes")}
    for name, (shape, meaning) in expected.items():
        if name in tensors and tensors[name].shape != shape:
            raise PackShapeError(f"tensor {name!r} has shape {list(tensors[name].shape)}, expected {list(shape)} "
                                 f"({meaning})", path, name)


def _check_values(reading: _Reading) -> None:
    """Row 15: at least 2 classes, unique labels, heads inside the grid and distinct, counts >= 1, finite floats."""
    tensors, path = reading.tensors, reading.path
    heads, labels = tensors[fmt.HEADS], reading.values[fmt.META_LABELS]
    layers, num_heads, _ = reading.values[fmt.META_MODEL]["grid"]
    if len(labels) < 2:
        raise PackValueError(f"{fmt.META_LABELS} has {len(labels)} class; a classifier needs at least 2", path, fmt.META_LABELS)
    if len(set(labels)) != len(labels) or not all(labels):
        raise PackValueError(f"{fmt.META_LABELS} must be unique non-empty strings, got {labels!r}", path, fmt.META_LABELS)
    outside = (heads[:, 0] < 0) | (heads[:, 0] >= layers) | (heads[:, 1] < 0) | (heads[:, 1] >= num_heads)
    if outside.any():
        bad = heads[np.argmax(outside)].tolist()
        raise PackValueError(f"tensor 'heads' holds {bad}, outside the model grid of {layers} layers x {num_heads} heads", path, fmt.HEADS)
    if len({(int(a), int(b)) for a, b in heads}) != len(heads):
        raise PackValueError("tensor 'heads' lists a head twice", path, fmt.HEADS)
    if (tensors[fmt.CLASS_COUNTS] < 1).any():
        raise PackValueError("tensor 'class_counts' must be >= 1 for every class", path, fmt.CLASS_COUNTS)
    for name in (fmt.CENTROIDS, fmt.HEAD_SCORES, fmt.ALL_HEAD_SCORES, *fmt.PROBE_TENSORS):
        if name in tensors and not np.isfinite(tensors[name]).all():
            raise PackValueError(f"tensor {name!r} holds NaN or Inf", path, name)


# (row, check) in the order docs/format.md section 4 gives them; tests/test_specs.py holds the table to this list.
VALIDATION_ROWS = (
    (7, _check_format_name), (8, _check_format_version), (9, _check_required_keys), (10, _warn_unknown_keys),
    (11, _parse_json_values), (12, _check_metadata_values), (13, _check_tensor_types), (14, _check_shapes),
    (15, _check_values),
)


def _required_meta(version: int) -> tuple[str, ...]:
    return fmt.REQUIRED_META + ((fmt.META_SCORING,) if version >= 2 else ())


def _load_json(metadata: dict[str, str], key: str, path: object) -> Any:
    try:
        value = json.loads(metadata[key], parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise PackTypeError(f"{key} is not valid JSON: {exc}", path, key) from None
    if not files.is_valid_unicode(value):
        raise PackTypeError(f"{key} holds invalid Unicode (a lone surrogate escape such as \\udc80)", path, key)
    return value


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _check_object(values: dict[str, Any], key: str, required: tuple[str, ...], path: object) -> dict[str, Any]:
    value = values[key]
    if not isinstance(value, dict):
        raise PackTypeError(f"{key} must be a JSON object, got {type(value).__name__}", path, key)
    missing = [name for name in required if name not in value]
    if missing:
        raise PackMissingKeyError(f"{key} lacks field(s) {missing}", path, key)
    return value


def _dump_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_jsonable)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
