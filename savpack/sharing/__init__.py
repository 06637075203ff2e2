"""Sharing packs: content hashes, verification, recorded held-out metrics, folder registries and the hub.

The content hash of a pack is the sha256 of its file's bytes (docs/format.md). Where the expected hash comes from:
a folder registry's index.json, a hub repository's savpack.json manifest (both written by push), or a sidecar
`PACK.sha256` (sha256sum format) that pull writes beside the pulled file and `savpack verify` reads.

One module per idea: `packfile` (hash, identity, sidecar, delivery), `verify`, `record` (eval --record), `refs`
(parsing a registry or hub reference), `registry` (folder registries), `hub`; this module dispatches a reference to
its registry. Nothing here imports torch: push, pull, list and verify without --model stay quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import SharingError
from .record import record_held_out
from .hub import HUB_PACK_FILE, hub_pull, hub_push, hub_versions
from .packfile import PullResult, PushResult, read_pack, sha256_hex
from .refs import HubRef, RegistryRef, parse_ref
from .registry import FolderRegistry
from .verify import Verification, verify_pack

__all__ = ["FolderRegistry", "HUB_PACK_FILE", "HubRef", "PullResult", "PushResult", "RegistryRef", "Verification",
           "hub_pull", "hub_push", "list_packs", "parse_ref", "pull", "push", "read_pack", "record_held_out",
           "sha256_hex", "verify_pack"]


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
