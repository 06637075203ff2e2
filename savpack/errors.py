"""The builder's error types, beside the runtime's (savpack_runtime.errors), under the same base class."""

from __future__ import annotations

from savpack_runtime.errors import DataError, MissingExtraError, SavpackError

__all__ = ["BuildError", "DataError", "ExportError", "IdentityError", "MissingExtraError", "ModelError", "SharingError"]


class ModelError(SavpackError):
    """A model cannot be loaded or is not supported. The message names the model and, where known, the family."""


class ExportError(SavpackError):
    """An ONNX export failed or its graph disagrees with the model."""


class BuildError(SavpackError, ValueError):
    """Head selection cannot run with these settings (k, scoring, vote) or this data (one class, bad shapes). A
    ValueError too, as scikit-learn's conventions expect of an estimator's bad input."""


class IdentityError(SavpackError):
    """A pack name or version is malformed, or a pack lacks the name and version sharing needs."""


class SharingError(SavpackError):
    """A registry or hub reference is malformed, or a push, pull or list failed. The message names the reference."""
