"""Sharing packs: content hashes, verification, recorded held-out metrics, folder registries and the hub.

The content hash of a pack is the sha256 of its file's bytes (docs/format.md). Where the expected hash comes from:
a folder registry's index.json, a hub repository's savpack.json manifest (both written by push), or a sidecar
`PACK.sha256` (sha256sum format) that pull writes beside the pulled file and `savpack verify` reads.

Nothing here imports torch: push, pull, list and verify without --model stay quick.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import time
import urllib.parse
import urllib.request
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from savpack_runtime import Pack, files
from savpack_runtime import format as fmt
from savpack_runtime.compat import BUILDER_PACKAGE, version_refusal
from savpack_runtime.errors import ModelMismatchError, PackError, PackVersionError, SavpackError, SavpackWarning

from .errors import IdentityError, SharingError
from .versions import LATEST, check_name, check_version, latest, sorted_versions

SIDECAR_SUFFIX = ".sha256"
REGISTRY_FORMAT = "savpack-registry"
REGISTRY_FORMAT_VERSION = 1
REGISTRY_SUPPORTED_VERSIONS = (1,)
INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
LOCK_TIMEOUT_SECONDS = 60.0
HUB_PACK_FILE = "pack.safetensors"
HUB_MANIFEST_FILE = "savpack.json"
HUB_CARD_FILE = "README.md"
HELD_OUT_PREFIX = "held_out_"
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    if not words or not _SHA256.fullmatch(words[0].lower()):
        raise SharingError(f"{sidecar}: expected '<64 hex digits>  {Path(path).name}' (sha256sum format)")
    return words[0].lower()


# -- verify ------------------------------------------------------------------------------------------------------

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
    from .pipeline import check_pack_fits  # torch: only when a model is checked

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


# -- held-out metrics --------------------------------------------------------------------------------------------

def record_held_out(path: str | Path, evaluated: Pack, report: dict[str, Any], examples: Sequence[Any]) -> tuple[Pack, str]:
    """Store `savpack eval`'s held-out metrics in the pack file (atomic rewrite); returns the new pack and its sha256.

    Replaces earlier held-out metrics. Refuses if the file changed since it was evaluated, or if it holds keys this
    savpack does not know (rewriting would drop them)."""
    from .data import dataset_summary
    from .pipeline import held_out

    data, on_disk = read_pack(path)
    if evaluated.to_bytes() != data:
        raise SharingError(f"{path}: the file is not the pack that was evaluated (changed meanwhile, or holds keys "
                           "this savpack does not know and would drop); nothing recorded")
    kept, _ = held_out(on_disk, examples)
    summary = dataset_summary([example.digest() for example in kept], [example.label for example in kept])
    metrics = {key: value for key, value in on_disk.metrics.items() if not key.startswith(HELD_OUT_PREFIX)}
    metrics.update({
        "held_out_examples": report["examples"],
        "held_out_accuracy": round(report["accuracy"], 6),
        "held_out_balanced_accuracy": round(report["balanced_accuracy"], 6),
        "held_out_macro_f1": round(report["macro_f1"], 6),
        "held_out_per_class_accuracy": {label: round(value, 6) for label, value in report["per_class_accuracy"].items()},
    })
    dataset = {**on_disk.dataset, "held_out": {key: summary[key] for key in ("sha256", "examples", "class_counts")}}
    updated = on_disk.replace(metrics=metrics, dataset=dataset)
    updated.save(path, force=True)
    digest = updated.content_hash()
    if read_sidecar(path) is not None:
        write_sidecar(path, digest)  # the user changed the pack on purpose; a stale sidecar would only mislead
    return updated, digest


# -- references --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RegistryRef:
    """file:///path/registry[/NAME[@VERSION]]: the folder (registry root or a pack's folder in it) and a version."""

    path: Path
    version: str | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text or str(self.path)


@dataclass(frozen=True)
class HubRef:
    """ORG/REPO[@REVISION]: a hub repository and a branch, tag (a pack version) or commit."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_ref(text: str) -> RegistryRef | HubRef:
    if text.startswith("file:"):
        parsed = urllib.parse.urlparse(text)
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise SharingError(f"{text!r}: a folder registry is a file URL with an absolute path, file:///path/registry")
        folder, _, last = urllib.request.url2pathname(parsed.path).rstrip("/").rpartition("/")
        last, at, version = last.partition("@")
        if at and not version:
            raise SharingError(f"{text!r}: nothing after '@'; give a version (1.2.0) or {LATEST}")
        return RegistryRef(Path(f"{folder}/{last}" if folder or last else "/"), version or None, text)
    repo_id, at, revision = text.partition("@")
    if "://" in text or repo_id.count("/") != 1 or (at and not revision):
        raise SharingError(f"{text!r} is neither a hub reference ORG/REPO[@REVISION] nor a folder registry "
                           "file:///path/registry[/NAME[@VERSION]]")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise SharingError(f"{text!r}: not a valid hub repository id: {str(exc).splitlines()[0]}") from None
    return HubRef(repo_id, revision or None)


def _entry(pack: Pack, data: bytes, file: str) -> dict[str, Any]:
    """What a registry index and a hub manifest record of one pack version."""
    return {"name": pack.name, "version": pack.version, "file": file, "sha256": sha256_hex(data), "size": len(data),
            "format_version": pack.format_version, "labels": list(pack.labels),
            "model": {"id": pack.model["id"], "revision": pack.model.get("revision")}}


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


@dataclass
class PullResult:
    path: Path
    name: str
    version: str
    sha256: str
    source: str


def _deliver(data: bytes, source: str, expected: dict[str, Any], out_dir: str | Path, force: bool) -> PullResult:
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


# -- folder registries -------------------------------------------------------------------------------------------

@dataclass
class PushResult:
    name: str
    version: str
    sha256: str
    status: str  # added | unchanged | replaced
    where: str


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
            if (folder / INDEX_FILE).is_file():
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
        # Hidden entries do not count: the lock and temporary files of a registry another push is creating right now.
        if root.exists() and (not root.is_dir() or any(not entry.name.startswith(".") for entry in root.iterdir())):
            raise SharingError(f"{ref}: {root} exists and is not a savpack registry (no {INDEX_FILE}); use a new or empty folder")
        if not root.parent.is_dir():
            raise SharingError(f"{ref}: folder {root.parent} does not exist")
        root.mkdir(exist_ok=True)
        registry = cls(root)
        with registry._locked():
            if not registry.index_path.exists():
                registry._write_index({"format": REGISTRY_FORMAT, "format_version": REGISTRY_FORMAT_VERSION, "packs": {}})
        return registry

    def read_index(self) -> dict[str, Any]:
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SharingError(f"{self.index_path}: registry index does not exist") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise SharingError(f"{self.index_path}: registry index is unreadable: {exc}") from None
        if not isinstance(index, dict) or index.get("format") != REGISTRY_FORMAT or not isinstance(index.get("packs"), dict):
            raise SharingError(f"{self.index_path}: not a savpack registry index (expected format {REGISTRY_FORMAT!r} and a 'packs' object)")
        version = index.get("format_version")
        if type(version) is not int:
            raise SharingError(f"{self.index_path}: registry format_version is {version!r}, expected an integer")
        refusal = version_refusal(version, REGISTRY_SUPPORTED_VERSIONS, "registry format version", BUILDER_PACKAGE)
        if refusal:
            raise SharingError(f"{self.index_path}: {refusal}")
        return index

    def _write_index(self, index: dict[str, Any]) -> None:
        data = _json_bytes(index)
        files.atomic_write(self.index_path, lambda handle: handle.write(data), force=True)

    @contextmanager
    def _locked(self, timeout: float = LOCK_TIMEOUT_SECONDS) -> Iterator[None]:
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
        entry = _entry(pack, data, relative)
        with self._locked():
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
        return _deliver(bytes(files.read_bytes(source)), str(source), entry, out_dir, force)


# -- the hub (huggingface_hub) -----------------------------------------------------------------------------------

@contextmanager
def _hub_errors(ref: HubRef, action: str) -> Iterator[None]:
    """huggingface_hub's and its HTTP client's exceptions as one-line savpack errors naming the reference."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{action} {ref}"
    try:
        yield
    except OfflineModeIsEnabled:
        raise SharingError(f"{where}: the hub is off limits in offline mode (HF_HUB_OFFLINE=1); unset it to reach "
                           "the hub, or share through a folder registry (file:///path/registry)") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise SharingError(f"{where}: not in the local cache, and offline mode (HF_HUB_OFFLINE=1) forbids "
                               "downloading it") from None
        raise SharingError(f"{where}: cannot reach the hub, and the file is not in the local cache") from None
    except RevisionNotFoundError:
        raise SharingError(f"{where}: the repository has no revision {ref.revision!r}") from None
    except RepositoryNotFoundError:
        raise SharingError(f"{where}: repository not found (or private or gated: log in with `hf auth login`)") from None
    except EntryNotFoundError:
        raise SharingError(f"{where}: the repository has no {HUB_MANIFEST_FILE}: not a savpack repository") from None
    except HfHubHTTPError as exc:
        raise SharingError(f"{where}: the hub refused: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise SharingError(f"{where}: cannot reach the hub: {exc}") from None
    except Exception as exc:
        if not _is_transport_error(exc):
            raise
        raise SharingError(f"{where}: cannot reach the hub: {exc}") from None


def _is_transport_error(exc: Exception) -> bool:
    # huggingface_hub lets its HTTP client's connection errors through, and has changed clients across versions
    # (requests, httpx, httpx2): recognise them by module rather than import one client by name.
    return type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3", "httpcore")


def _hub_manifest(repo_id: str, revision: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo_id, HUB_MANIFEST_FILE, revision=revision)
    where = f"{repo_id}@{revision} {HUB_MANIFEST_FILE}"
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SharingError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise SharingError(f"{where}: expected a JSON object")
    for key in ("name", "version", "file", "sha256"):
        if not isinstance(manifest.get(key), str):
            raise SharingError(f"{where}: field {key!r} is missing or not a string")
    if not _SHA256.fullmatch(manifest["sha256"]) or "/" in manifest["file"] or manifest["file"].startswith("."):
        raise SharingError(f"{where}: 'sha256' must be 64 lowercase hex digits and 'file' a plain file name")
    return manifest


def hub_versions(ref: HubRef) -> list[dict[str, Any]]:
    """The repository's pack versions: its tags that are semantic versions, in precedence order."""
    from huggingface_hub import HfApi

    with _hub_errors(ref, "list"):
        tags = HfApi().list_repo_refs(ref.repo_id).tags
    versions = {tag.name: tag.target_commit for tag in tags if _is_version(tag.name)}
    newest = latest(versions)
    return [{"name": ref.repo_id, "version": version, "commit": versions[version], "latest": version == newest}
            for version in sorted_versions(versions)]


def _is_version(text: str) -> bool:
    try:
        check_version(text)
    except IdentityError:
        return False
    return True


def hub_push(path: str | Path, ref: HubRef, card: str, private: bool = False, force: bool = False) -> PushResult:
    """One commit holding the pack, its manifest and its card, tagged with the pack's version."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if ref.revision:
        raise SharingError(f"{ref}: push to ORG/REPO without '@': the pack's version becomes the tag")
    data, pack = read_pack(path)
    name, version = require_identity(pack, path)
    manifest = _entry(pack, data, HUB_PACK_FILE)
    api = HfApi()
    with _hub_errors(ref, "push to"):
        api.create_repo(ref.repo_id, private=private, exist_ok=True)
        tagged = version in {tag.name for tag in api.list_repo_refs(ref.repo_id).tags}
        if tagged:
            existing = _hub_manifest(ref.repo_id, version)
            if existing["sha256"] == manifest["sha256"]:
                return PushResult(name, version, manifest["sha256"], "unchanged", ref.repo_id)
            if not force:
                raise SharingError(f"{ref.repo_id}@{version} already holds other bytes (sha256 {existing['sha256'][:12]}, "
                                   f"this pack {manifest['sha256'][:12]}); a pushed version is immutable: bump --version, "
                                   "or pass --force to move the tag")
        commit = api.create_commit(
            ref.repo_id,
            operations=[CommitOperationAdd(path_in_repo=HUB_PACK_FILE, path_or_fileobj=data),
                        CommitOperationAdd(path_in_repo=HUB_MANIFEST_FILE, path_or_fileobj=_json_bytes(manifest)),
                        CommitOperationAdd(path_in_repo=HUB_CARD_FILE, path_or_fileobj=card.encode())],
            commit_message=f"{name} {version}",
        )
        if tagged:
            api.delete_tag(ref.repo_id, tag=version)
        api.create_tag(ref.repo_id, tag=version, revision=commit.oid)
    return PushResult(name, version, manifest["sha256"], "replaced" if tagged else "added", ref.repo_id)


def hub_pull(ref: HubRef, out_dir: str | Path, force: bool = False) -> PullResult:
    """Download the manifest and the pack of one commit, check the sha256 and the pack, then write them."""
    from huggingface_hub import HfApi, constants, hf_hub_download

    revision = ref.revision
    if revision == LATEST:
        versions = hub_versions(ref)
        if not versions:
            raise SharingError(f"{ref}: the repository has no version tags")
        revision = next(row["version"] for row in versions if row["latest"])
    with _hub_errors(HubRef(ref.repo_id, revision), "pull"):
        if not constants.HF_HUB_OFFLINE:
            # Pin one commit so the manifest and the pack cannot come from two different pushes.
            revision = HfApi().model_info(ref.repo_id, revision=revision).sha
        manifest = _hub_manifest(ref.repo_id, revision)
        pack_path = hf_hub_download(ref.repo_id, manifest["file"], revision=revision)
    return _deliver(bytes(files.read_bytes(pack_path)), f"{ref.repo_id}@{revision}", manifest, out_dir, force)


# -- dispatch ----------------------------------------------------------------------------------------------------

def push(path: str | Path, target: str, card: Callable[[], str], private: bool = False, force: bool = False) -> PushResult:
    ref = parse_ref(target)
    if isinstance(ref, HubRef):
        return hub_push(path, ref, card(), private=private, force=force)
    return FolderRegistry.create_or_open(ref).push(path, force=force)


def pull(source: str, out_dir: str | Path = ".", force: bool = False) -> PullResult:
    ref = parse_ref(source)
    if isinstance(ref, HubRef):
        return hub_pull(ref, out_dir, force=force)
    registry, name = FolderRegistry.open(ref)
    if name is None:
        raise SharingError(f"{ref}: name a pack: file://{registry.root}/NAME[@VERSION]")
    return registry.pull(name, ref.version, out_dir, force=force)


def list_packs(source: str) -> list[dict[str, Any]]:
    ref = parse_ref(source)
    if isinstance(ref, HubRef):
        return hub_versions(ref)
    registry, name = FolderRegistry.open(ref)
    return [row for row in registry.entries() if name is None or row["name"] == name]


__all__ = ["FolderRegistry", "HubRef", "RegistryRef", "Verification", "hub_pull", "hub_push", "list_packs",
           "parse_ref", "pull", "push", "read_pack", "record_held_out", "verify_pack"]
