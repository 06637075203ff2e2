"""Folder registries: `ROOT/NAME/VERSION.safetensors` side by side, listed in `ROOT/index.json`, changed under a
file lock and by atomic rename (docs/decisions.md, "Folder registry")."""

from __future__ import annotations

import datetime
import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from savpack_runtime import files
from savpack_runtime.compat import BUILDER_PACKAGE, version_refusal

from ..errors import IdentityError, SharingError
from ..versions import LATEST, check_name, check_version, latest, sorted_versions
from .packfile import PullResult, PushResult, deliver, index_entry, json_bytes, read_pack, require_identity
from .refs import RegistryRef

REGISTRY_FORMAT = "savpack-registry"
REGISTRY_FORMAT_VERSION = 1
REGISTRY_SUPPORTED_VERSIONS = (1,)
INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
LOCK_TIMEOUT_SECONDS = 60.0
MAX_INDEX_BYTES = 64 * 1024 * 1024  # an entry is ~300 bytes: room for 200,000 pack versions
_SHA256 = re.compile(r"[0-9a-f]{64}")


class FolderRegistry:
    """Packs side by side in a folder: ROOT/NAME/VERSION.safetensors, listed in ROOT/index.json.

    index.json is the authority (a file it does not list is ignored); every change to it happens under an exclusive
    lock on ROOT/.lock and lands by atomic rename, so concurrent pushes neither lose entries nor leave a torn index.
    """

    def __init__(self, root: Path):
        self.root = root

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_FILE

    @classmethod
    def open(cls, ref: RegistryRef) -> tuple["FolderRegistry", str | None]:
        """The registry holding `ref`'s folder and the pack name the rest of the path spells (None at the root)."""
        for folder in (ref.path, *ref.path.parents):
            if os.path.lexists(folder / INDEX_FILE):  # whatever it is: read_index names a FIFO or a link loop there
                name = ref.path.relative_to(folder).as_posix()
                return cls(folder), (check_name(name, f"{ref}: pack name") if name != "." else None)
        raise SharingError(f"{ref}: no savpack registry ({INDEX_FILE}) at {ref.path} or in a folder above it")

    @classmethod
    def create_or_open(cls, ref: RegistryRef) -> "FolderRegistry":
        """For push: the registry at exactly `ref`'s folder, created when the folder is new or empty."""
        if ref.version:
            raise SharingError(f"{ref}: push to the registry root, file:///path/registry; the name and version come from the pack")
        root = ref.path
        if (root / INDEX_FILE).is_file():
            return cls(root)
        if any((parent / INDEX_FILE).is_file() for parent in root.parents):
            raise SharingError(f"{ref}: is inside a registry; push to the registry root (the folder holding {INDEX_FILE})")
        if root.exists() and not root.is_dir():
            raise SharingError(f"{ref}: {root} exists and is not a folder")
        if not root.parent.is_dir():
            raise SharingError(f"{ref}: folder {root.parent} does not exist")
        root.mkdir(exist_ok=True)
        registry = cls(root)
        with registry.locked():
            # Decided under the lock: two first pushes race here, and the one that waited finds the index the other
            # one wrote (and its pack), which is a registry to push to, not a foreign folder.
            if registry.index_path.is_file():
                return registry
            # Hidden entries do not count: the lock file, and a leftover of an interrupted first push.
            if any(not entry.name.startswith(".") for entry in root.iterdir()):
                raise SharingError(f"{ref}: {root} exists and is not a savpack registry (no {INDEX_FILE}); use a new or empty folder")
            registry._write_index({"format": REGISTRY_FORMAT, "format_version": REGISTRY_FORMAT_VERSION, "packs": {}})
        return registry

    def read_index(self) -> dict[str, Any]:
        """The index, checked entry by entry (a bad entry names the index file and the entry)."""
        try:
            index = json.loads(files.read_file(self.index_path, MAX_INDEX_BYTES, SharingError, "registry index"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise SharingError(f"{self.index_path}: registry index is unreadable: {exc}") from None
        if not isinstance(index, dict) or index.get("format") != REGISTRY_FORMAT or not isinstance(index.get("packs"), dict):
            raise SharingError(f"{self.index_path}: not a savpack registry index (expected format {REGISTRY_FORMAT!r} and a 'packs' object)")
        version = index.get("format_version")
        if type(version) is not int:
            raise SharingError(f"{self.index_path}: registry format_version is {version!r}, expected an integer")
        refusal = version_refusal(version, REGISTRY_SUPPORTED_VERSIONS, "registry format version", BUILDER_PACKAGE)
        if refusal:
            raise SharingError(f"{self.index_path}: {refusal}")
        for name, versions in index["packs"].items():
            self._check_entries(name, versions)
        return index

    def _check_entries(self, name: Any, versions: Any) -> None:
        """One pack name's entries: a valid name, valid versions, each a file inside the registry and its sha256."""
        where = f"{self.index_path}: entry {name!r}"
        try:
            check_name(name, "pack name")
        except (IdentityError, TypeError) as exc:
            raise SharingError(f"{where}: {exc}") from None
        if not isinstance(versions, dict):
            raise SharingError(f"{where}: must map versions to entries, got {type(versions).__name__}")
        for version, entry in versions.items():
            where = f"{self.index_path}: entry {name}@{version}"
            try:
                check_version(version)
            except (IdentityError, TypeError) as exc:
                raise SharingError(f"{where}: {exc}") from None
            if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                    and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
                raise SharingError(f"{where}: must be an object with 'file' (a path) and 'sha256' (64 hex digits)")
            file = entry["file"]
            target = os.path.realpath(self.root / file)
            if Path(file).is_absolute() or ".." in Path(file).parts or \
                    not Path(target).is_relative_to(os.path.realpath(self.root)):
                raise SharingError(f"{where}: file {file!r} points outside the registry; an index may only name "
                                   "files inside its own folder")

    def _write_index(self, index: dict[str, Any]) -> None:
        data = json_bytes(index)
        files.atomic_write(self.index_path, lambda handle: handle.write(data), force=True)

    @contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT_SECONDS) -> Iterator[None]:
        """Hold the registry's exclusive lock: every read-modify-write of the index happens inside it."""
        try:
            import fcntl
        except ImportError:
            raise SharingError("folder registries need POSIX file locks (fcntl), which this platform lacks") from None
        lock_path = self.root / LOCK_FILE
        with open(lock_path, "a+b") as handle:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise SharingError(f"{lock_path}: the registry stayed locked by another push for {timeout:.0f} s; try again") from None
                    time.sleep(0.02)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def entries(self) -> list[dict[str, Any]]:
        """Every pack version, by name then semver precedence, each marked whether it is its name's latest."""
        rows = []
        for name, versions in sorted(self.read_index()["packs"].items()):
            newest = latest(versions)
            rows += [{"name": name, "version": version, "latest": version == newest, **versions[version]}
                     for version in sorted_versions(versions)]
        return rows

    def resolve(self, name: str, version: str | None) -> dict[str, Any]:
        versions = self.read_index()["packs"].get(name)
        if not versions:
            known = sorted(self.read_index()["packs"])
            raise SharingError(f"{self.root}: no pack named {name!r} (the registry holds: {', '.join(known) or 'nothing'})")
        if version in (None, LATEST):
            version = latest(versions)
        elif version not in versions:
            check_version(version, f"{name}@{version}: version")
            raise SharingError(f"{self.root}: {name} has no version {version} (it has: {', '.join(sorted_versions(versions))})")
        return {**versions[version], "name": name, "version": version}

    def push(self, path: str | Path, force: bool = False) -> PushResult:
        data, pack = read_pack(path)
        name, version = require_identity(pack, path)
        relative = f"{name}/{version}.safetensors"
        entry = index_entry(pack, data, relative)
        with self.locked():
            index = self.read_index()
            existing = index["packs"].get(name, {}).get(version)
            if existing and existing["sha256"] == entry["sha256"]:
                return PushResult(name, version, entry["sha256"], "unchanged", str(self.root))
            if existing and not force:
                raise SharingError(
                    f"{self.root}: {name}@{version} already holds other bytes (sha256 {existing['sha256'][:12]}, this pack "
                    f"{entry['sha256'][:12]}); a pushed version is immutable: bump --version, or pass --force to replace it"
                )
            target = self.root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            # A file the index does not list is a leftover of an interrupted push: replacing it is safe.
            files.atomic_write(target, lambda handle: handle.write(data), force=True)
            entry["pushed_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            del entry["name"], entry["version"]
            index["packs"].setdefault(name, {})[version] = entry
            self._write_index(index)
        return PushResult(name, version, entry["sha256"], "replaced" if existing else "added", str(self.root))

    def pull(self, name: str, version: str | None, out_dir: str | Path, force: bool = False) -> PullResult:
        entry = self.resolve(name, version)
        source = self.root / entry["file"]
        return deliver(bytes(files.read_bytes(source)), str(source), entry, out_dir, force)
