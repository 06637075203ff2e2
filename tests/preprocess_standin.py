"""A stand-in for savpack.preprocess_spec (built on another branch), used only when the real module is absent.

It writes the two files the contract names, with just enough in them for the export tests here; the runtime's real
Preprocessor reads what the real write_preprocessing writes. Remove once both branches are merged.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path


def write_preprocessing(loaded, prompt: dict, folder: Path) -> dict:
    loaded.tokenizer.backend_tokenizer.save(str(Path(folder) / "tokenizer.json"))
    (Path(folder) / "preprocess.json").write_text(json.dumps({"stand_in": True, "prompt": prompt}, sort_keys=True))
    return {"files": ["tokenizer.json", "preprocess.json"], "stand_in": True}


def install() -> bool:
    """Make `savpack.preprocess_spec` importable if it is not; True when the stand-in was installed."""
    try:
        import savpack.preprocess_spec  # noqa: F401
        return False
    except ImportError:
        module = types.ModuleType("savpack.preprocess_spec")
        module.write_preprocessing = write_preprocessing
        sys.modules["savpack.preprocess_spec"] = module
        import savpack

        savpack.preprocess_spec = module
        return True
