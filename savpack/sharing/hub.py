"""Hub repositories through huggingface_hub: one tagged commit per push (pack, savpack.json manifest, card), pulls
pinned to one commit (docs/decisions.md, "Hub")."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from savpack_runtime import files

from ..errors import IdentityError, SharingError
from ..versions import LATEST, check_version, latest, sorted_versions
from .packfile import SHA256_PATTERN, PullResult, PushResult, deliver, index_entry, json_bytes, read_pack, require_identity
from .refs import HubRef

HUB_PACK_FILE = "pack.safetensors"
HUB_MANIFEST_FILE = "savpack.json"
HUB_CARD_FILE = "README.md"


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
    if not SHA256_PATTERN.fullmatch(manifest["sha256"]) or "/" in manifest["file"] or manifest["file"].startswith("."):
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
    manifest = index_entry(pack, data, HUB_PACK_FILE)
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
                        CommitOperationAdd(path_in_repo=HUB_MANIFEST_FILE, path_or_fileobj=json_bytes(manifest)),
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
    return deliver(bytes(files.read_bytes(pack_path)), f"{ref.repo_id}@{revision}", manifest, out_dir, force)
