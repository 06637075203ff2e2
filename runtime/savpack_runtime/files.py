"""Strict safetensors reading, deterministic writing, and atomic replacement of files and folders.

The safetensors library writes metadata in hash-map order (a different byte layout in every process), so packs are
serialised here: sorted keys, fixed separators, header padded to 8 bytes. Reading is strict in the same spirit as the
library (offsets contiguous, the buffer fully accounted for) but raises savpack's named errors, so a hostile file
yields a message naming what is wrong.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import stat
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np

from . import format as fmt
from .errors import InputError, LocatedError, OutputPathError, PackHeaderError, PackReadError, PackSizeError, PackTypeError, SavpackError

MAX_RANK = 8  # numpy allows 64 dimensions; no savpack tensor has more than 4
_NUMPY_TO_DTYPE = {np.dtype(v).newbyteorder("<") if v != "|u1" else np.dtype(v): k for k, v in fmt.DTYPES.items()}


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _fail(error: type[SavpackError], path: object, message: str) -> SavpackError:
    """`error` naming `path`: located errors keep the path apart (`.path`), the others carry it in the message."""
    return error(message, path) if issubclass(error, LocatedError) else error(f"{path}: {message}")


def _stat(path: Path, error: type[SavpackError], what: str) -> os.stat_result:
    """stat() following symbolic links, with every failure as `error` (never opens the file)."""
    try:
        return path.stat()
    except FileNotFoundError:
        if os.path.lexists(path):
            raise _fail(error, path, f"{what} is a symbolic link to nothing (broken link)") from None
        raise _fail(error, path, f"{what} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _fail(error, path, f"{what} is a symbolic link loop") from None
        if exc.errno == errno.ENAMETOOLONG:
            raise _fail(error, path, f"{what}: the path is too long") from None
        raise _fail(error, path, f"{what} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:  # an embedded NUL byte
        raise _fail(error, repr(str(path)), f"{what}: not a usable path ({exc})") from None


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_file(path: str | os.PathLike, error: type[SavpackError] = InputError, what: str = "file",
               max_bytes: int | None = None) -> int:
    """Refuse, before anything opens it, whatever is not a regular file of at most `max_bytes`: a missing path, a
    folder, a device (/dev/zero never ends), a FIFO (opening it blocks), a socket, a symbolic link loop. Returns the
    size. One check for every file savpack reads; `error` is the caller's named error type."""
    path = Path(path)
    status = _stat(path, error, what)
    if stat.S_ISDIR(status.st_mode):
        raise _fail(error, path, f"{what} is a folder, expected a file")
    if not stat.S_ISREG(status.st_mode):
        raise _fail(error, path, f"{what} is {_kind(status.st_mode)}, not a regular file")
    if max_bytes is not None and status.st_size > max_bytes:
        raise _fail(error, path, f"{what} is {status.st_size} bytes, more than the limit of {max_bytes}")
    return status.st_size


def check_folder(path: str | os.PathLike, error: type[SavpackError] = InputError, what: str = "folder") -> Path:
    """Refuse whatever is not a folder (following symbolic links), naming what it is instead."""
    path = Path(path)
    status = _stat(path, error, what)
    if not stat.S_ISDIR(status.st_mode):
        kind = "a file" if stat.S_ISREG(status.st_mode) else _kind(status.st_mode)
        raise _fail(error, path, f"{what} is {kind}, expected a folder")
    return path


def read_file(path: str | os.PathLike, max_bytes: int, error: type[SavpackError] = InputError, what: str = "file") -> bytes:
    """A regular file's bytes, refused before reading when larger than `max_bytes` (and never more read than that:
    the file may grow between the check and the read)."""
    check_file(path, error, what, max_bytes)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise _fail(error, path, f"{what} cannot be read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise _fail(error, path, f"{what} grew past the limit of {max_bytes} bytes while being read")
    return data


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a regular file, read in 1 MB blocks (graph weights can exceed memory twice over)."""
    check_file(path)
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _writable_folder(path: Path) -> Path:
    """The output's folder, proven writable by creating and removing a probe file in it: os.access() answers yes
    to root everywhere, and no permission bit tells of a read-only mount or a full quota of files."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputPathError(f"{path}: folder {folder} does not exist")
    probe = folder / f".savpack-probe.{secrets.token_hex(6)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise OutputPathError(f"{path}: folder {folder} is not writable ({exc.strerror or exc})") from None
    probe.unlink(missing_ok=True)
    return folder


def _refuse_inputs(path: Path, inputs: Sequence[str | os.PathLike | None]) -> None:
    """An output may not be an input, hold one (a folder being replaced), or lie inside an input folder."""
    target = Path(os.path.realpath(path))  # realpath, not resolve(): a symbolic link loop is an input's problem, named later
    for given in inputs:
        if given is None or not os.path.lexists(given):
            continue
        source = Path(os.path.realpath(given))
        same = target == source or (target.exists() and source.exists() and os.path.samefile(target, source))
        if same or source.is_relative_to(target) or (source.is_dir() and target.is_relative_to(source)):
            relation = "is" if same else "holds" if source.is_relative_to(target) else "lies inside"
            raise OutputPathError(f"{path}: the output {relation} the input {given}; savpack never writes over its "
                                  "inputs: choose another output path")


def _output(path: str | os.PathLike, inputs: Sequence[str | os.PathLike | None]) -> Path:
    """What every output must be: in a writable folder, none of the inputs, not a symbolic link (replacing a link
    would surprise whoever set it, and writing through it would land elsewhere)."""
    path = Path(path)
    _writable_folder(path)
    _refuse_inputs(path, inputs)
    if path.is_symlink():
        raise OutputPathError(f"{path}: is a symbolic link; savpack does not replace links (remove it or choose another path)")
    return path


def check_output_path(path: str | os.PathLike, force: bool = False, inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Refuse early what `atomic_write` would refuse late: a missing or read-only folder, an existing file (unless
    `force`), and, even with `force`, anything but a regular file (a folder, a device, a FIFO, a symbolic link) or
    one of the command's `inputs`."""
    path = _output(path, inputs)
    if path.is_dir():
        raise OutputPathError(f"{path}: is a folder, expected a file path")
    if os.path.lexists(path):
        kind = _kind(os.lstat(path).st_mode) if not path.is_file() else None
        if kind is not None:
            raise OutputPathError(f"{path}: is {kind}; savpack replaces only regular files")
        if not force:
            raise OutputPathError(f"{path}: exists; pass --force (force=True) to replace it")
    return path


def check_output_folder(path: str | os.PathLike, force: bool = False, *, marker: str,
                        inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Refuse early what `staged_folder` would refuse late, the folder form of check_output_path: an existing folder
    is replaced only with `force`, and only if it holds `marker` (the file that says savpack wrote it: a bundle's
    bundle.json); never an input, a file, a link."""
    path = _output(path, inputs)
    if os.path.lexists(path):
        if not path.is_dir():
            raise OutputPathError(f"{path}: exists and is not a folder")
        if not force:
            raise OutputPathError(f"{path}: exists; pass --force (force=True) to replace it")
        if not (path / marker).is_file():
            raise OutputPathError(f"{path}: exists and holds no {marker}, so savpack did not write it; --force "
                                  "replaces only a folder savpack wrote: choose another path")
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


@contextmanager
def staged_folder(path: str | os.PathLike, force: bool = False, *, marker: str,
                  inputs: Sequence[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """A new empty folder beside `path` to fill; when the block succeeds it is renamed onto `path`, when it fails it
    is removed. An existing `path` (force only, and only a folder holding `marker`: check_output_folder) is renamed
    aside first and removed once the new folder is in place, so a crash leaves the old folder or the new one."""
    path = check_output_folder(path, force, marker=marker, inputs=inputs)
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


def is_valid_unicode(value: object) -> bool:
    """Whether every string in a parsed JSON value encodes as UTF-8. JSON's \\uXXXX escapes can spell lone
    surrogates, which Python keeps in a str but no file, terminal or JSON encoder of UTF-8 accepts."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    if not is_valid_unicode(header):
        entries = list(header.items()) + list((header.get("__metadata__") or {}).items() if isinstance(header.get("__metadata__"), dict) else [])
        key = next(key for key, value in reversed(entries) if not is_valid_unicode([key, value]))
        raise PackHeaderError(f"header entry {key!r} holds invalid Unicode (a lone surrogate escape such as \\udc80)",
                              path, key if is_valid_unicode(key) else None)

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
    size = check_file(path, PackReadError)
    if max_bytes is not None:
        if size > max_bytes:
            raise PackSizeError(f"file is {size} bytes, more than the limit of {max_bytes}", path)
        return read_file(path, max_bytes, PackReadError)
    try:
        # Large activation files are mapped, not read: only the slices used get paged in.
        return path.read_bytes() if size < 8 else memoryview(np.memmap(path, np.uint8, "r"))
    except OSError as exc:
        raise PackReadError(f"file cannot be read: {exc.strerror or exc}", path) from None


def read(path: str | os.PathLike, max_bytes: int | None = fmt.MAX_PACK_BYTES) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read and parse a safetensors file; files above `max_bytes` are refused before reading."""
    return loads(read_bytes(path, max_bytes), Path(path))
