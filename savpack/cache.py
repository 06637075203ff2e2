"""Where savpack keeps what it makes once and reuses (converted models, cached activations, benchmark models).

`$SAVPACK_CACHE` if set, else `$XDG_CACHE_HOME/savpack`, else `~/.cache/savpack`: the user's cache folder, never a
path of one machine.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache folder (or a sub-folder of it); not created here, callers create what they write."""
    root = os.environ.get("SAVPACK_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "savpack"
    return Path(root).joinpath(*parts)
