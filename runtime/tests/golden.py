"""The golden cases in exported/bundles/ (made by tools/make_exported.py), read with numpy only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
EXPORTED = ROOT / "exported" / "bundles"
CASES = ("qwen2_vl", "llava_onevision", "qwen2", "qwen2_5_vl", "llava", "gemma3_text", "gpt2", "bert", "gemma3",
         "smolvlm", "qwen3_vl")
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


def recorded_batches(case: str) -> dict[str, Any]:
    """{"all": every item encoded by the builder in one batch, "first": item 0 alone, "order": the rows of "all"}."""
    with np.load(case_dir(case) / "inputs.npz") as data:
        arrays = {key: data[key] for key in data.files}
    batches: dict[str, Any] = {"all": {}, "first": {}}
    for key, value in arrays.items():
        batch, name = key.split(".", 1)
        if name != "order":
            batches[batch][name] = value
    return batches | {"order": arrays["all.order"]}


def within_tolerance(found: np.ndarray, wanted: np.ndarray) -> bool:
    return bool(np.abs(found - wanted).max() <= TOLERANCE * (1 + np.abs(wanted).max()))
