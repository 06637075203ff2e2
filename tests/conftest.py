"""Shared test fixtures: tiny random-weight models built once per test run, small generated datasets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from savpack.testing import build_fixture, write_colour_task

# Tiny models run fastest single-threaded, and a busy 2-core machine makes threads fight.
torch.set_num_threads(1)

CORE_FAMILIES = ("qwen2_vl", "llava_onevision", "qwen2", "llama")
MORE_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava", "idefics3", "smolvlm", "gemma3", "gpt2", "gemma3_text")
ALL_FAMILIES = CORE_FAMILIES + MORE_FAMILIES
IMAGE_FIXTURES = ("qwen2_vl", "llava_onevision", "qwen2_5_vl", "qwen3_vl", "llava", "idefics3", "smolvlm", "gemma3")


@pytest.fixture(scope="session")
def fixtures_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def model_dir(fixtures_root):
    """model_dir(name) -> folder of the tiny fixture `name`, built on first use."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_fixture(name, fixtures_root / name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def loaded_model(model_dir):
    """loaded_model(name) -> LoadedModel of the fixture on CPU, loaded once."""
    from savpack.models import load_model

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(str(model_dir(name)), device="cpu")
        return cache[name]

    return get


@pytest.fixture(scope="session")
def colour_task(tmp_path_factory) -> tuple[Path, Path]:
    """(train.jsonl, test.jsonl): pictures labelled by dominant colour, 8 and 4 per class."""
    folder = tmp_path_factory.mktemp("colour")
    return write_colour_task(folder, 8, seed=1, name="train"), write_colour_task(folder, 4, seed=2, name="test")


@pytest.fixture(scope="session")
def text_task(tmp_path_factory) -> tuple[Path, Path]:
    """(train.jsonl, test.jsonl): short sentences labelled by the kind of words in them, 8 and 4 per class."""
    folder = tmp_path_factory.mktemp("text")
    words = {"warm": ["red", "yellow", "sun", "fire"], "cold": ["blue", "green", "ice", "snow"], "shape": ["circle", "square", "triangle", "dot"]}
    rng = random.Random(0)

    def write(name: str, per_class: int) -> Path:
        lines = []
        for label, vocabulary in words.items():
            for _ in range(per_class):
                text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(2, 6)))
                lines.append(json.dumps({"text": f"the {text} is here", "label": label}))
        path = folder / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        return path

    return write("train", 8), write("test", 4)


def task_for(name: str, colour_task, text_task) -> tuple[Path, Path]:
    return colour_task if name in IMAGE_FIXTURES else text_task
