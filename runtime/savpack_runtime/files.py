"""Strict safetensors reading, deterministic writing, and atomic replacement of files and folders.

The safetensors library writes metadata in hash-map order (a different byte layout in every process), so packs are
serialised here: sorted keys, fixed separators, header padded to 8 bytes. Reading is strict in the same spirit as the
library (offsets contiguous, the buffer fully accounted for) but raises savpack's named errors, so a hostile file
yields a message naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from . import format as fmt
from .errors import OutputPathError, PackHeaderError, PackReadError, PackSizeError, PackTypeError

MAX_RANK = 8  # numpy allows 64 dimensions; no savpack tensor has more than 4
_NUMPY_TO_DTYPE = {np.dtype(v).newbyteorder("<") if v != "|u1" else np.dtype(v): k for k, v in fmt.DTYPES.items()}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MB blocks (graph weights can exceed memory twice over)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def check_output_path(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse early what `atomic_write` would refuse late: a missing or read-only folder, or an existing file."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputPathError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{path}: folder {folder} is not writable")
    if path.is_dir():
        raise OutputPathError(f"{path}: is a folder, expected a file path")
    if path.exists() and not force:
        raise OutputPathError(f"{path}: exists; pass --force (force=True) to replace it")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], force: bool = False) -> Path:
    """Write through `write(file)` into a temporary file beside `path`, fsync it, then rename it over `path`.

    A crash at any point leaves either the old file or the new one, never a mix.
    """
    path = check_output_path(path, force)
    # Not tempfile.mkstemp: it creates mode 0600, and the renamed file would be unreadable to the other users of a
    # shared folder or registry. O_EXCL with mode 0666 lets the umask decide, as for any new file.
    while True:
        tmp_name = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputPathError(f"{path}: cannot write in folder {path.parent}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def check_output_folder(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse early what `staged_folder` would refuse late: a missing parent folder, a file in the way, or an
    existing folder without force."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputPathError(f"{path}: folder {parent} does not exist")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path}: exists and is not a folder")
    if path.exists() and not force:
        raise OutputPathError(f"{path}: exists; pass --force (force=True) to replace it")
    return path


@contextmanager
def staged_folder(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """A new empty folder beside `path` to fill; when the block succeeds it is renamed onto `path`, when it fails it
    is removed. An existing `path` (force only) is renamed aside first and removed once the new folder is in place,
    so a crash leaves the old folder or the new one, never a mix."""
    path = check_output_folder(path, force)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield work
        # mkdtemp makes the folder private (0700); the folder it becomes gets what the umask allows, as any new one.
        umask = os.umask(0)
        os.umask(umask)
        work.chmod(0o777 & ~umask)
        _move_into_place(work, path, force)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _move_into_place(work: Path, path: Path, force: bool) -> None:
    if not path.exists():
        work.rename(path)
        return
    if not force:
        raise OutputPathError(f"{path}: exists; pass --force (force=True) to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    old.rmdir()
    path.rename(old)
    try:
        work.rename(path)
    except BaseException:
        old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk; some filesystems refuse to open folders.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _header_and_arrays(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> tuple[bytes, list[np.ndarray]]:
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    arrays, offset = [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
        if dtype not in _NUMPY_TO_DTYPE:
            raise TypeError(f"tensor {name!r}: dtype {array.dtype} is not one of {sorted(fmt.DTYPES)}")
        array = np.ascontiguousarray(array, dtype=dtype)
        header[name] = {"dtype": _NUMPY_TO_DTYPE[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        arrays.append(array)
        offset += array.nbytes
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as the library pads it
    return struct.pack("<Q", len(encoded)) + encoded, arrays


def dumps(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """Serialise to safetensors bytes; the same inputs always give the same bytes."""
    header, arrays = _header_and_arrays(tensors, metadata)
    return header + b"".join(array.tobytes() for array in arrays)


def write(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str], force: bool = False) -> Path:
    """Write a safetensors file atomically, streaming tensor data (activation files can be large)."""
    header, arrays = _header_and_arrays(tensors, metadata)

    def write_to(handle: BinaryIO) -> None:
        handle.write(header)
        for array in arrays:
            handle.write(memoryview(array.reshape(-1)).cast("B"))

    return atomic_write(path, write_to, force)


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"duplicate key {duplicate!r}")
    return dict(pairs)


def loads(data: bytes | memoryview, path: object = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes strictly. Arrays are read-only views into `data`."""
    size = len(data)
    if size < 8:
        raise PackSizeError(f"file is {size} bytes, shorter than the 8-byte header length field", path)
    (header_size,) = struct.unpack("<Q", bytes(data[:8]))
    if header_size > size - 8:
        raise PackSizeError(f"header claims {header_size} bytes but only {size - 8} follow the length field (truncated file?)", path)
    if header_size > fmt.MAX_HEADER_BYTES:
        raise PackSizeError(f"header claims {header_size} bytes, more than the limit of {fmt.MAX_HEADER_BYTES}", path)
    try:
        header = json.loads(bytes(data[8 : 8 + header_size]).decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PackHeaderError(f"header is not valid JSON: {exc}", path) from None
    if not isinstance(header, dict):
        raise PackHeaderError(f"header is a JSON {type(header).__name__}, expected an object", path)

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PackTypeError("__metadata__ must be an object of string values", path, "__metadata__")

    body = memoryview(data)[8 + header_size :]
    entries = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise PackHeaderError(f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets", path, name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in fmt.DTYPES:
            raise PackTypeError(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(fmt.DTYPES)}", path, name)
        if not (isinstance(shape, list) and len(shape) <= MAX_RANK and all(type(n) is int and n >= 0 for n in shape)):
            raise PackHeaderError(f"tensor {name!r}: shape {shape!r} is not a list of at most {MAX_RANK} non-negative integers", path, name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise PackHeaderError(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end", path, name)
        nbytes = math.prod(shape) * np.dtype(fmt.DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise PackHeaderError(f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes, data_offsets span {offsets[1] - offsets[0]}", path, name)
        entries.append((offsets[0], offsets[1], name, dtype, shape))

    entries.sort()
    position = 0
    for begin, end, name, _, _ in entries:
        if begin != position:
            raise PackHeaderError(f"tensor {name!r}: data starts at {begin}, expected {position} (gap or overlap)", path, name)
        position = end
    if position > len(body):
        raise PackSizeError(f"tensor data needs {position} bytes but the file holds {len(body)} (truncated file?)", path)
    if position < len(body):
        raise PackSizeError(f"{len(body) - position} trailing bytes after the tensor data", path)

    tensors = {
        name: np.frombuffer(body[begin:end], dtype=np.dtype(fmt.DTYPES[dtype])).reshape(shape)
        for begin, end, name, dtype, shape in entries
    }
    return tensors, metadata


def read_bytes(path: str | os.PathLike, max_bytes: int | None = fmt.MAX_PACK_BYTES) -> bytes | memoryview:
    """A file's bytes; files above `max_bytes` are refused before reading (None: no limit, the file is mapped)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise PackSizeError(f"file is {size} bytes, more than the limit of {max_bytes}", path)
        # Large activation files are mapped, not read: only the slices used get paged in.
        return path.read_bytes() if max_bytes is not None or size < 8 else memoryview(np.memmap(path, np.uint8, "r"))
    except FileNotFoundError:
        raise PackReadError("file does not exist", path) from None
    except IsADirectoryError:
        raise PackReadError("is a folder, expected a file", path) from None
    except PermissionError:
        raise PackReadError("file is not readable (permission denied)", path) from None


def read(path: str | os.PathLike, max_bytes: int | None = fmt.MAX_PACK_BYTES) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read and parse a safetensors file; files above `max_bytes` are refused before reading."""
    return loads(read_bytes(path, max_bytes), Path(path))
