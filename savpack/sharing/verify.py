"""`savpack verify`: integrity against a recorded sha256, format version, validity, identity and, on request, that
a model fits. Every problem becomes a failed check, never an exception."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from savpack_runtime import Pack, files
from savpack_runtime import format as fmt
from savpack_runtime.errors import ModelMismatchError, PackError, PackVersionError, SavpackError, SavpackWarning

from ..errors import IdentityError, SharingError
from .packfile import SIDECAR_SUFFIX, read_sidecar, require_identity, sha256_hex, sidecar_path

PASS, FAIL, WARN, SKIP = "pass", "fail", "warn", "skip"


@dataclass
class Check:
    name: str
    status: str  # pass | fail | warn | skip
    detail: str


@dataclass
class Verification:
    path: str
    checks: list[Check] = field(default_factory=list)
    sha256: str | None = None
    pack: Pack | None = None

    @property
    def ok(self) -> bool:
        return all(check.status != FAIL for check in self.checks)

    @property
    def verdict(self) -> str:
        if not self.ok:
            return "FAILED: " + ", ".join(check.name for check in self.checks if check.status == FAIL)
        skipped = [check.name for check in self.checks if check.status == SKIP]
        return "OK" + (f" (not checked: {', '.join(skipped)})" if skipped else "")

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    def to_json(self) -> dict[str, Any]:
        pack = self.pack
        return {
            "pack": self.path, "ok": self.ok, "verdict": self.verdict, "sha256": self.sha256,
            "name": pack.name if pack else None, "version": pack.version if pack else None,
            "format_version": pack.format_version if pack else None,
            "checks": [{"name": check.name, "status": check.status, "detail": check.detail} for check in self.checks],
        }


def verify_pack(path: str | Path, expected_sha256: str | None = None,
                load_model: Callable[[], Any] | None = None) -> Verification:
    """Check a pack file: integrity against a recorded sha256, format version, validity, identity, and (when
    `load_model` is given) that the model it returns is the one the pack was built for. Never raises for a bad pack:
    every problem becomes a failed check."""
    result = Verification(str(path))
    try:
        data = bytes(files.read_bytes(path))
    except PackError as exc:
        result.add("readable", FAIL, str(exc))
        return result
    result.sha256 = sha256_hex(data)
    _check_integrity(result, path, expected_sha256)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SavpackWarning)
        try:
            pack = Pack.from_bytes(data, path)
        except PackVersionError as exc:
            result.add("format version", FAIL, str(exc))
            return result
        except PackError as exc:
            result.add("valid", FAIL, str(exc))
            return result
    result.pack = pack
    result.add("format version", PASS, f"{pack.format_version} (this reader reads {list(fmt.SUPPORTED_VERSIONS)})")
    notes = [str(warning.message) for warning in caught if issubclass(warning.category, SavpackWarning)]
    result.add("valid", WARN if notes else PASS, "; ".join(notes) or "header, keys, types, shapes and values check out")
    if pack.to_bytes() == data:
        result.add("canonical", PASS, "byte-identical to savpack's deterministic writing")
    else:
        result.add("canonical", WARN, "not in savpack's canonical layout (written by another tool, or holding keys this "
                                      "reader ignores); its content hash is still the sha256 of the file")
    try:
        name, version = require_identity(pack, path)
        result.add("identity", PASS, f"{name} {version}")
    except IdentityError as exc:
        result.add("identity", WARN, str(exc))
    if load_model is not None:
        _check_model(result, pack, load_model)
    return result


def _check_integrity(result: Verification, path: str | Path, expected: str | None) -> None:
    source = "--sha256"
    if expected is None:
        try:
            expected, source = read_sidecar(path), str(sidecar_path(path))
        except SharingError as exc:
            result.add("integrity", FAIL, str(exc))
            return
    if expected is None:
        result.add("integrity", SKIP, f"no recorded sha256 to compare with: pass --sha256, or keep {Path(path).name}"
                                      f"{SIDECAR_SUFFIX} beside the pack (savpack pull writes it)")
    elif expected.strip().lower() == result.sha256:
        result.add("integrity", PASS, f"sha256 {result.sha256} matches {source}")
    else:
        result.add("integrity", FAIL, f"sha256 {result.sha256} differs from {expected.strip()} recorded in {source}: "
                                      "the file changed after the hash was recorded")


def _check_model(result: Verification, pack: Pack, load_model: Callable[[], Any]) -> None:
    from ..pipeline import check_pack_fits  # torch: only when a model is checked

    try:
        loaded = load_model()
    except SavpackError as exc:
        result.add("model", FAIL, str(exc))
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SavpackWarning)
        try:
            check_pack_fits(pack, loaded)
        except ModelMismatchError as exc:
            result.add("model", FAIL, str(exc))
            return
    # check_pack_fits warns when the weights match under another id or revision (a local copy of a hub model).
    notes = [str(warning.message) for warning in caught if issubclass(warning.category, SavpackWarning)]
    result.add("model", WARN if notes else PASS, "; ".join(notes) or
               f"{loaded.model_id} at revision {loaded.revision} fits: family {loaded.family.name}, grid "
               f"{list(loaded.grid)}, weights fingerprint and prompt rendering match")
