"""Nothing in savpack deserialises pickles or runs a model repository's code unless asked."""

import inspect
import re
from pathlib import Path

from savpack.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("savpack", "runtime/savpack_runtime", "tools") for p in (ROOT / folder).rglob("*.py"))


def test_no_pickle_and_torch_load_only_with_weights_only():
    assert SOURCES
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), f"{path}: {call.group(0)}"
        assert "allow_pickle=True" not in text, path


def test_remote_code_is_off_by_default():
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
