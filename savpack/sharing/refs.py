"""Where packs are shared: `file:///path/registry[/NAME[@VERSION]]` (a folder registry) or `ORG/REPO[@REVISION]`
(a hub repository)."""

from __future__ import annotations

import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import SharingError
from ..versions import LATEST

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
