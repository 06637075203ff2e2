"""The runtime's error types. Each failure has its own named type; every message names the file, key or value at fault.

The builder's errors (data, model, export) derive from `SavpackError` too, so one `except SavpackError` catches
every user-facing failure of the toolchain.
"""

from __future__ import annotations


class SavpackError(Exception):
    """Base of every error savpack raises on purpose: a user-facing message, never a bug."""


class LocatedError(SavpackError):
    """An error about a file: `path` and `key` (the field or tensor) name what is wrong when known."""

    def __init__(self, message: str, path: object = None, key: str | None = None):
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{where}{message}")
        self.path = path
        self.key = key


class PackError(LocatedError):
    """A pack file cannot be trusted. `path` and `key` name what is wrong when known."""


class PackReadError(PackError):
    """The file does not exist, is a folder, or cannot be read."""


class PackSizeError(PackError):
    """The file is too small, too large, truncated, or has bytes the header does not account for."""


class PackHeaderError(PackError):
    """The safetensors header is not valid JSON, or a tensor entry in it is malformed."""


class PackMissingKeyError(PackError):
    """A required tensor or metadata key is absent."""


class PackTypeError(PackError):
    """A tensor has the wrong dtype or rank, or a metadata value has the wrong type or is not valid JSON."""


class PackShapeError(PackError):
    """Tensor shapes disagree with each other or with the labels and model grid."""


class PackValueError(PackError):
    """A value is out of range: head outside the grid, NaN or Inf, duplicate labels, bad counts."""


class PackVersionError(PackError):
    """The pack was written by a format version this reader does not know."""


class InputError(SavpackError):
    """An item to classify is unusable: missing or broken image, empty text. The message names the file or field."""


class InputSizeError(InputError):
    """An item is too large to classify: a prompt longer than the model's context, an image over the pixel limit."""


class ImageSizeError(InputSizeError):
    """An image declares more pixels than the limit (a decompression bomb declares a huge size in a few bytes)."""


class DataError(InputError):
    """A dataset, an item in it, or a file it names is unusable. The message names the file, line and field."""


class PreprocessSpecError(SavpackError):
    """A preprocessing spec (preprocess.json) or its tokenizer.json is missing, unreadable or invalid; the message
    names the file and the field."""


class OutputPathError(SavpackError):
    """An output path cannot be written: missing folder, not writable, or exists without --force."""


class ModelMismatchError(SavpackError):
    """A pack is used with a model (or graph) other than the one it was built for."""


class BundleError(LocatedError):
    """A bundle folder cannot be trusted: missing or altered file, malformed bundle.json. Names the file and key."""


class BundleVersionError(BundleError):
    """The bundle was written by a format version this reader does not know."""


class GraphError(SavpackError):
    """An ONNX graph cannot be used: unreadable, non-standard operators, or onnxruntime refuses it."""


class MissingExtraError(SavpackError):
    """An optional dependency is not installed; the message names the extra and gives the pip command."""


class SavpackWarning(UserWarning):
    """Something works but deserves attention: labels differing only in case, duplicates, unknown pack keys."""
