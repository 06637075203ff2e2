"""Which format versions a reader accepts, and what it tells the user about the others: one rule for packs,
bundles, preprocessing specs, folder registries and activations files (docs/format.md, "Compatibility policy")."""

from __future__ import annotations

from typing import Sequence

RUNTIME_PACKAGE = "savpack-runtime"  # readers of packs, bundles and specs
BUILDER_PACKAGE = "savpack"  # readers of registries and activations files


def version_refusal(version: int, supported: Sequence[int], what: str, package: str) -> str | None:
    """None when `version` is one of `supported`; else the reason to refuse it. Only a newer version is fixed by
    upgrading `package`; an older one is read by an earlier release, and an upgrade would not help.

    what: how the message names the version, e.g. "pack format version" -> "pack format version 2 is newer ...".
    """
    if version in supported:
        return None
    newest = max(supported)
    if version > newest:
        return f"{what} {version} is newer than this reader's {newest}; upgrade with: pip install --upgrade {package}"
    return f"{what} {version} is not supported: this {package} reads version(s) {sorted(supported)}, an earlier release wrote it"
