"""`savpack demo`: the whole flow offline, on a tiny random-weight Qwen2-VL and a generated picture task."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from .report import format_report


def run_demo(workdir: Path | None = None, echo=click.echo) -> dict:
    """Build a fixture model and data in `workdir` (a temporary folder if None), build a pack, evaluate it."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="savpack-demo-") as tmp:
            return run_demo(Path(tmp), echo)
    import torch

    from savpack_runtime.items import load_examples

    from .models import load_model
    from .pipeline import evaluate, extract_activations, pack_from_activations
    from .testing import COLOURS, build_fixture, write_colour_task

    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    echo("savpack demo: the full flow offline. The model's weights are RANDOM, so its heads carry no knowledge;")
    echo("what they still carry is the signal of the input itself, enough for an easy task like this one.\n")
    model_dir = build_fixture("qwen2_vl", workdir / "tiny-qwen2-vl")
    train_file = write_colour_task(workdir, per_class=20, seed=1, name="train")
    test_file = write_colour_task(workdir, per_class=10, seed=2, name="test")
    echo(f"model  tiny Qwen2-VL with random weights, built in {model_dir}")
    echo(f"task   dominant colour of generated pictures ({', '.join(COLOURS)}): 20 per class to build ({train_file.name}), 10 per class held out ({test_file.name})")

    loaded = load_model(str(model_dir), device="cpu")
    started = time.perf_counter()
    activations = extract_activations(loaded, load_examples(train_file), "{text}", batch_size=8)
    pack = pack_from_activations(activations, k=20, name="demo/colour", version="0.1.0")
    pack_path = pack.save(workdir / "colour.pack.safetensors", force=True)
    build_seconds = time.perf_counter() - started
    echo(f"built  {pack_path} in {build_seconds:.1f} s: {pack.k} heads vote, deepest layer {pack.deepest_layer}\n")

    report = evaluate(loaded, pack, load_examples(test_file), batch_size=8)
    echo(format_report(report))
    echo("\nWith a real model (downloads from the hub), the same flow is:")
    echo("  savpack build --model Qwen/Qwen2-VL-2B-Instruct --data train.jsonl --shots 20 --out pack.safetensors")
    echo("  savpack eval  --model Qwen/Qwen2-VL-2B-Instruct --pack pack.safetensors --data test.jsonl")
    return {"pack": str(pack_path), "report": report, "build_seconds": build_seconds}
