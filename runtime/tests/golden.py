"""The golden cases in exported/ (made by tools/make_exported.py), read with numpy only.

ReplayPreprocessor stands in for savpack_runtime.preprocess.Preprocessor while that module (built on another branch)
is absent: it replays the encodings the builder recorded in inputs.npz, so the classifier's own flow (bundle, session,
metadata checks, planning, per-pack votes) is tested against the builder's numbers. Tests that need the real
preprocessing skip until it is present.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
EXPORTED = ROOT / "exported"
CASES = ("qwen2_vl", "llava_onevision", "qwen2")
TOLERANCE = 1e-4


def case_dir(case: str) -> Path:
    return EXPORTED / case


def bundle_dir(case: str) -> Path:
    return EXPORTED / case / "bundle"


def expected(case: str) -> dict[str, Any]:
    return json.loads((case_dir(case) / "expected.json").read_text())


def expected_vectors(case: str) -> np.ndarray:
    with np.load(case_dir(case) / "expected.npz") as data:
        return data["head_vectors"]


def items(case: str) -> list[dict[str, Any]]:
    """The items as the runtime takes them: text and image paths (absolute)."""
    folder = case_dir(case)
    records = [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines() if line.strip()]
    return [{"text": record["text"], "images": [str(folder / image) for image in record["images"]]} for record in records]


def recorded_batches(case: str) -> dict[str, dict[str, np.ndarray]]:
    """{"all": encoded batch of every item in the runtime's batch order, "first": item 0 alone}, and the order."""
    with np.load(case_dir(case) / "inputs.npz") as data:
        arrays = {key: data[key] for key in data.files}
    batches: dict[str, dict[str, np.ndarray]] = {"all": {}, "first": {}}
    for key, value in arrays.items():
        batch, name = key.split(".", 1)
        if name != "order":
            batches[batch][name] = value
    return batches | {"order": arrays["all.order"]}


def real_preprocessor_available() -> bool:
    return importlib.util.find_spec("savpack_runtime.preprocess") is not None


def made_with_stand_in() -> bool:
    return json.loads((EXPORTED / "manifest.json").read_text()).get("preprocessing_stand_in", False)


class ReplayPreprocessor:
    """Preprocessor.load(bundle folder) / render(text, image_count) / encode(prompts, images), from recordings."""

    def __init__(self, case_folder: Path):
        case = case_folder.name
        prompts = expected(case)["prompts"]
        batches = recorded_batches(case)
        self.prompts = {(item["text"], len(item["images"])): prompt for item, prompt in zip(items(case), prompts)}
        self.batches = {tuple(prompts[i] for i in batches["order"]): batches["all"], (prompts[0],): batches["first"]}

    @classmethod
    def load(cls, folder: Path) -> "ReplayPreprocessor":
        return cls(Path(folder).resolve().parent)

    def render(self, text: str, image_count: int) -> str:
        return self.prompts[(text, image_count)]

    def encode(self, prompts: list[str], images: list) -> dict[str, np.ndarray]:
        key = tuple(prompts)
        if key not in self.batches:
            raise AssertionError(f"no recorded encoding for the batch {key}")
        return self.batches[key]


def real_preprocessing_usable() -> bool:
    """The real Preprocessor exists and exported/ holds the preprocessing files it reads."""
    return real_preprocessor_available() and not made_with_stand_in()


def replay_module() -> types.ModuleType:
    module = types.ModuleType("savpack_runtime.preprocess")
    module.Preprocessor = ReplayPreprocessor
    return module


def install_replay_preprocessor() -> bool:
    """Register the replay stand-in as savpack_runtime.preprocess unless the real one can run; True if installed."""
    if real_preprocessing_usable():
        return False
    sys.modules["savpack_runtime.preprocess"] = replay_module()
    return True
