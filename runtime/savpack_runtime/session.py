"""The onnxruntime session behind a bundle: provider choice with honest fallback, and a refusal of graphs that use
operators outside the standard ONNX domain.

onnxruntime-gpu lists CUDAExecutionProvider among its available providers even on a machine where CUDA cannot run;
the session then silently runs on the CPU. What runs is read back from the session (`get_providers()`), and a
request for CUDA that did not take effect is reported with a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import GraphError, SavpackWarning
from .files import read_file

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Only the standard operator set: no contrib or custom operators, whose meaning depends on the runtime build.
STANDARD_DOMAINS = ("", "ai.onnx")
MAX_GRAPH_PROTO_BYTES = 2 * 1024 * 1024 * 1024  # protobuf's own limit; weights live in the external data file
# onnxruntime starts every thread it is told to when the session opens: 100000 hangs the machine.
MAX_THREADS = 1024


def resolve_providers(providers: str | Sequence[str]) -> list[str]:
    """'cpu', 'cuda', or onnxruntime provider names, in preference order; the CPU always ends the list."""
    names = [providers] if isinstance(providers, str) else list(providers)
    resolved = []
    for name in names:
        full = PROVIDERS.get(name.lower(), name) if isinstance(name, str) else name
        if not isinstance(full, str) or not full.endswith("ExecutionProvider"):
            raise GraphError(f"provider {name!r} is not one of {sorted(PROVIDERS)} or an onnxruntime provider name")
        if full not in resolved:
            resolved.append(full)
    if PROVIDERS["cpu"] not in resolved:
        resolved.append(PROVIDERS["cpu"])
    return resolved


class GraphSession:
    """An onnxruntime InferenceSession over a truncated graph: `run(feed)` -> head vectors (B, k, head_dim)."""

    def __init__(self, path: str | os.PathLike, providers: str | Sequence[str] = "cpu", threads: int | None = None):
        import onnxruntime

        self.path = Path(path)
        if threads is not None and not (type(threads) is int and 1 <= threads <= MAX_THREADS):
            raise GraphError(f"threads must be a whole number from 1 to {MAX_THREADS} (None: all cores), got {threads!r}")
        check_operator_domains(self.path)
        requested = resolve_providers(providers)
        available = onnxruntime.get_available_providers()
        wanted = [name for name in requested if name in available]
        missing = [name for name in requested if name not in available]
        if missing:
            warnings.warn(f"onnxruntime here lacks {missing} (available: {available}); running on {wanted}", SavpackWarning, stacklevel=2)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # provider fallbacks are reported below, once, as a warning
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            if wanted == [PROVIDERS["cpu"]]:
                raise GraphError(f"{self.path}: onnxruntime cannot load the graph: {_first_line(exc)}") from None
            warnings.warn(f"{self.path}: onnxruntime could not create a session with {wanted} ({_first_line(exc)}); "
                          "falling back to the CPU", SavpackWarning, stacklevel=2)
            try:
                self.session = onnxruntime.InferenceSession(str(self.path), options, providers=[PROVIDERS["cpu"]])
            except Exception as retry:
                raise GraphError(f"{self.path}: onnxruntime cannot load the graph: {_first_line(retry)}") from None
        self.providers = list(self.session.get_providers())
        dropped = [name for name in wanted if name not in self.providers]
        if dropped:
            warnings.warn(f"{self.path}: {dropped} requested but not usable here; running on {self.providers}",
                          SavpackWarning, stacklevel=2)
        self.input_names = tuple(item.name for item in self.session.get_inputs())
        self.output_names = tuple(item.name for item in self.session.get_outputs())
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """The graph's first output: the head vectors (B, k, head_dim)."""
        return self.run_all(feed, self.output_names[:1])[self.output_names[0]]

    def run_all(self, feed: dict[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The graph's outputs `names` (default: all) by name."""
        names = list(self.output_names if names is None else names)
        missing = [name for name in self.input_names if name not in feed]
        if missing:
            raise GraphError(f"{self.path}: the graph needs inputs {missing}, the feed has {sorted(feed)}")
        unknown = [name for name in names if name not in self.output_names]
        if unknown:
            raise GraphError(f"{self.path}: the graph has no outputs {unknown} (it has {list(self.output_names)})")
        try:
            values = self.session.run(names, {name: feed[name] for name in self.input_names})
        except Exception as exc:
            shapes = {name: list(np.shape(feed[name])) for name in self.input_names}
            raise GraphError(f"{self.path}: onnxruntime failed on inputs {shapes}: {_first_line(exc)}") from None
        return dict(zip(names, values))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- a minimal reader of the ModelProto's top level (no `onnx` import: the runtime must not need it) -----------------

_OPSET_IMPORT = 8  # ModelProto.opset_import: repeated OperatorSetIdProto {1: domain, 2: version}
_FUNCTIONS = 25  # ModelProto.functions: model-local functions, each with its own domain


def check_operator_domains(path: Path) -> list[tuple[str, int]]:
    """Refuse a graph whose operator sets are not the standard ONNX domain; returns [(domain, version)]."""
    data = read_file(path, MAX_GRAPH_PROTO_BYTES, GraphError, "graph file")  # protobuf's limit: weights live outside
    opsets, functions = [], 0
    try:
        for field, value in _fields(data):
            if field == _OPSET_IMPORT:
                parts = dict(_fields(value))
                opsets.append((bytes(parts.get(1, b"")).decode("utf-8"), int(parts.get(2, 0))))
            elif field == _FUNCTIONS:
                functions += 1
    except (ValueError, UnicodeDecodeError) as exc:
        raise GraphError(f"{path}: not an ONNX model file ({exc})") from None
    if not opsets:
        raise GraphError(f"{path}: not an ONNX model file (no operator set declared)")
    foreign = [domain for domain, _ in opsets if domain not in STANDARD_DOMAINS]
    if foreign or functions:
        what = f"operator domains {foreign}" if foreign else f"{functions} model-local function(s)"
        raise GraphError(f"{path}: the graph uses {what}; savpack graphs use only the standard ONNX operators")
    return opsets


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def _fields(data: bytes) -> Iterable[tuple[int, bytes | int]]:
    """(field number, value) of each field of a protobuf message: ints for varints, bytes for length-delimited."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(data, position)
        elif wire == 1:
            value, position = data[position : position + 8], position + 8
        elif wire == 2:
            length, position = _varint(data, position)
            if position + length > len(data):
                raise ValueError(f"field {field} runs past the end of the file")
            value, position = data[position : position + length], position + length
        elif wire == 5:
            value, position = data[position : position + 4], position + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value
