"""The builder's error types, beside the runtime's (savpack_runtime.errors), under the same base class."""

from __future__ import annotations

from savpack_runtime.errors import InputError, SavpackError


class DataError(InputError):
    """A dataset, an item in it, or an image it names is unusable. The message names the file, line and field."""


class ModelError(SavpackError):
    """A model cannot be loaded or is not supported. The message names the model and, where known, the family."""


class ExportError(SavpackError):
    """An ONNX export failed or its graph disagrees with the model."""


class BuildError(SavpackError):
    """Head selection cannot run with these settings (k, scoring, classes)."""
