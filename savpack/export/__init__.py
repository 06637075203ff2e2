"""ONNX export of the truncated graph (the optional extra `savpack[export]`)."""

from __future__ import annotations

import importlib

from ..errors import MissingExtraError

EXTRA_MODULES = ("onnx", "onnxscript")


def require_export_extra() -> None:
    """Refuse, before any model loads, an export without the export extra (onnx stays optional: docs/decisions.md)."""
    missing = []
    for name in EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(f"savpack export needs {' and '.join(missing)}: pip install 'savpack[export]'")
