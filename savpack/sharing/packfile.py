"""A pack file as it travels: its content hash, its name and version, the sha256 sidecar, and the delivery of pulled
bytes (checked against the recorded hash and the reader before anything is written)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from savpack_runtime import Pack, files

from ..errors import IdentityError, SharingError
from ..versions import check_name, check_version

SIDECAR_SUFFIX = ".sha256"
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def read_pack(path: str | Path) -> tuple[bytes, Pack]:
    """The file's bytes and the validated pack parsed from exactly those bytes (hash and content cannot diverge)."""
    data = bytes(files.read_bytes(path))
    return data, Pack.from_bytes(data, path)


def require_identity(pack: Pack, path: object) -> tuple[str, str]:
    if not pack.name or not pack.version:
        raise IdentityError(f"{path}: the pack has no {'name' if not pack.name else 'version'}; sharing needs both: "
                            "build it with `savpack build ... --name NAME --version 1.0.0`")
    return check_name(pack.name, f"{path}: pack name"), check_version(pack.version, f"{path}: pack version")


def file_name_for(name: str, version: str) -> str:
    """`team/safety` 1.2.0 -> `safety-1.2.0.safetensors`: the file name pull writes."""
    return f"{name.rsplit('/', 1)[-1]}-{version}.safetensors"


# -- sidecars ----------------------------------------------------------------------------------------------------

def sidecar_path(path: str | Path) -> Path:
    return Path(f"{path}{SIDECAR_SUFFIX}")


def write_sidecar(path: str | Path, digest: str) -> Path:
    line = f"{digest}  {Path(path).name}\n"  # sha256sum's format: `sha256sum -c PACK.sha256` checks it too
    return files.atomic_write(sidecar_path(path), lambda handle: handle.write(line.encode()), force=True)


def read_sidecar(path: str | Path) -> str | None:
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    words = sidecar.read_text(encoding="utf-8", errors="replace").split()
    if not words or not SHA256_PATTERN.fullmatch(words[0].lower()):
        raise SharingError(f"{sidecar}: expected '<64 hex digits>  {Path(path).name}' (sha256sum format)")
    return words[0].lower()


def index_entry(pack: Pack, data: bytes, file: str) -> dict[str, Any]:
    """What a registry index and a hub manifest record of one pack version."""
    return {"name": pack.name, "version": pack.version, "file": file, "sha256": sha256_hex(data), "size": len(data),
            "format_version": pack.format_version, "labels": list(pack.labels),
            "model": {"id": pack.model["id"], "revision": pack.model.get("revision")}}


def json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


@dataclass
class PullResult:
    path: Path
    name: str
    version: str
    sha256: str
    source: str


def deliver(data: bytes, source: str, expected: dict[str, Any], out_dir: str | Path, force: bool) -> PullResult:
    """Check pulled bytes against the recorded hash and the reader, then write them and their sidecar into out_dir."""
    digest = sha256_hex(data)
    if digest != expected["sha256"]:
        raise SharingError(f"{source}: sha256 {digest} differs from the recorded {expected['sha256']}: the stored file "
                           "is corrupt or was changed outside savpack; nothing written")
    pack = Pack.from_bytes(data, source)  # refuses invalid packs and newer format versions, naming both versions
    if (pack.name, pack.version) != (expected["name"], expected["version"]):
        raise SharingError(f"{source}: holds {pack.name} {pack.version}, but was recorded as {expected['name']} {expected['version']}")
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise SharingError(f"--out {out_dir}: folder does not exist")
    target = out_dir / file_name_for(pack.name, pack.version)
    if not (target.is_file() and target.read_bytes() == data):
        files.atomic_write(target, lambda handle: handle.write(data), force)
    write_sidecar(target, digest)
    return PullResult(target, pack.name, pack.version, digest, source)


@dataclass
class PushResult:
    name: str
    version: str
    sha256: str
    status: str  # added | unchanged | replaced
    where: str
