"""Generated labelled tasks for the demo, the tests and the tools: pictures whose dominant colour is the label."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200)}
QUESTION = "What colour is this picture?"


def write_colour_task(folder: Path, per_class: int, seed: int, name: str) -> Path:
    """Pictures whose dominant colour is the label (noisy, varied sizes), as a JSONL file with a question each."""
    rng = np.random.default_rng(seed)
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for label, rgb in COLOURS.items():
        for index in range(per_class):
            height, width = (int(v) for v in rng.integers(48, 128, size=2))
            noise = rng.normal(0, 45, size=(height, width, 3))
            pixels = np.clip(np.array(rgb) * rng.uniform(0.6, 1.2) + noise, 0, 255).astype(np.uint8)
            path = image_dir / f"{name}-{label}-{index:03d}.png"
            Image.fromarray(pixels).save(path)
            lines.append(json.dumps({"question": QUESTION, "image": f"images/{path.name}", "label": label}))
    out = folder / f"{name}.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out
