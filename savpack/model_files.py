"""Checks of a local model before transformers reads it: the folder's files, the weights' headers, the config's sizes.

transformers opens whatever a folder holds (a FIFO named config.json blocks it forever), turns a truncated
safetensors file into a Rust error, divides by a zero head count, and initialises with random values, silently, every
weight the config declares but the files lack (a config of 10^5 layers over a 4-layer checkpoint allocates them all).
These checks run first and name the file or config field at fault (ModelError).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from savpack_runtime.files import check_file, check_folder

from .errors import ModelError

# Generous bounds on a language model's text config: the largest public models have ~130 layers, 128 heads,
# head_dim 256 and hidden size 16384. A config beyond them is a typo or hostile, and would allocate without bound.
CONFIG_LIMITS = {"num_hidden_layers": 1024, "num_attention_heads": 1024, "head_dim": 4096, "hidden_size": 65536}
MAX_CONFIG_BYTES = 256 * 1024 * 1024  # config, tokenizer and processor files: a large tokenizer.json is ~35 MB
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
# The config may declare at most this many times the parameters the weights hold (tied or shared tensors are stored
# once, so the factor is above 1; a config that declares more is not the config of these weights).
DECLARED_OVER_STORED = 1.5
_READ_BY_TRANSFORMERS = (".json", ".jinja", ".txt", ".model", ".tiktoken")  # read whole, so bounded here


def local_model_path(model: str) -> Path | None:
    """The local file or folder `model` names, or None for a hub id. A path that exists (even as a broken link or a
    link loop) or is spelled as one (absolute, ./, ../, ~) is local, so it never falls through to a hub download."""
    expanded = os.path.expanduser(model)
    if os.path.lexists(expanded) or model.startswith(("/", "./", "../", "~")) or model in (".", ".."):
        return Path(expanded)
    return None


def check_model_files(path: Path) -> None:
    """A local model is a regular .gguf file or a folder whose entries are regular files (or subfolders), with every
    file transformers reads whole within a size bound and every safetensors file whole (not truncated)."""
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        check_file(path, ModelError, "GGUF file")
        return
    check_folder(path, ModelError, "model folder")
    for entry in sorted(path.iterdir()):
        if entry.name.startswith(".") or entry.is_dir():
            continue
        limit = MAX_CONFIG_BYTES if entry.suffix.lower() in _READ_BY_TRANSFORMERS else None
        check_file(entry, ModelError, "model file", limit)
        if entry.suffix == ".safetensors":
            safetensors_elements(entry)


def safetensors_elements(path: Path) -> int:
    """Number of values a safetensors file stores, from its header; refuses a file cut short or padded."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ModelError(f"{path}: weights file is {size} bytes, too short for a safetensors header (truncated?)")
            (header_size,) = struct.unpack("<Q", head)
            if header_size > min(size - 8, MAX_SAFETENSORS_HEADER_BYTES):
                raise ModelError(f"{path}: weights file header claims {header_size} bytes, the file holds {size} "
                                 "(truncated or not a safetensors file)")
            header = json.loads(handle.read(header_size))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"{path}: weights file header is not valid JSON (truncated or not a safetensors file): {exc}") from None
    except OSError as exc:
        raise ModelError(f"{path}: weights file cannot be read: {exc.strerror or exc}") from None
    entries = [entry for name, entry in header.items() if name != "__metadata__"] if isinstance(header, dict) else None
    try:
        end = max((int(entry["data_offsets"][1]) for entry in entries), default=0)
        elements = sum(math.prod(int(n) for n in entry["shape"]) for entry in entries)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ModelError(f"{path}: weights file header does not describe tensors (not a safetensors file?)") from None
    stored = size - 8 - header_size
    if end != stored:
        state = "truncated" if end > stored else f"{stored - end} bytes longer than its tensors"
        raise ModelError(f"{path}: weights file is {state}: its tensors need {end} bytes after the header, the file "
                         f"holds {stored}")
    return elements


def check_text_config(text_config: Any, model: str) -> tuple[int, int, int]:
    """(layers, heads, head_dim) of the language model, each a whole number within CONFIG_LIMITS."""
    values = {}
    for name in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        value = getattr(text_config, name, None)
        if name == "hidden_size" and value is None:
            continue
        values[name] = _bounded(value, name, model)
    head_dim = getattr(text_config, "head_dim", None)
    if head_dim is None:
        if "hidden_size" not in values:
            raise ModelError(f"{model}: config gives neither head_dim nor hidden_size")
        head_dim = values["hidden_size"] // values["num_attention_heads"]
    return values["num_hidden_layers"], values["num_attention_heads"], _bounded(head_dim, "head_dim", model)


def _bounded(value: Any, name: str, model: str) -> int:
    limit = CONFIG_LIMITS[name]
    if type(value) is not int or not 1 <= value <= limit:
        raise ModelError(f"{model}: config {name} is {value!r}; expected a whole number from 1 to {limit}")
    return value


def check_declared_size(auto_class: Any, config: Any, folder: Path, model: str) -> None:
    """Refuse a config that declares far more parameters than the folder's safetensors weights hold, before
    transformers allocates (and randomly initialises) the difference. The model is built on the meta device: shapes
    only, no memory. Skipped for quantised checkpoints (packed values) and folders without safetensors weights."""
    import torch

    files = sorted(folder.glob("*.safetensors"))
    if not files or getattr(config, "quantization_config", None):
        return
    stored = sum(safetensors_elements(path) for path in files)
    with torch.device("meta"):
        skeleton = auto_class.from_config(config)
    declared = sum(parameter.numel() for parameter in skeleton.parameters())
    if declared > DECLARED_OVER_STORED * stored:
        raise ModelError(f"{model}: config.json declares a model of {declared:,} parameters, the weights hold "
                         f"{stored:,} values: the config does not belong to these weights (or they are incomplete)")


def check_loading_info(info: dict[str, Any], model: str) -> None:
    """transformers fills weights the files lack with random values and only logs it: refuse instead."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelError(f"{model}: the weights lack {len(missing)} tensor(s) the config declares ({shown}): a "
                         "truncated checkpoint, or a config.json that does not belong to these weights")
