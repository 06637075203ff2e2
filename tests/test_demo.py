"""`savpack demo`: the whole flow (build, evaluation with baselines, export, the runtime in a child process, card) on a
tiny Gemma 3 text model in the default run; on the real Gemma-3-270M with SAVPACK_SLOW_TESTS=1. `--vision` keeps the
tiny vision-language flow."""

from __future__ import annotations

import os
import re

import pytest
from click.testing import CliRunner

from savpack.cli import main
from savpack.demo import DEMO_DATA, run_demo
from savpack_runtime import Pack
from savpack_runtime.bundle import Bundle
from savpack_runtime.items import load_examples


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_the_shipped_data_is_held_out_and_carries_its_licence():
    train, test, new = (load_examples(DEMO_DATA / f"{name}.jsonl") for name in ("train", "test", "new"))
    assert [len(part) for part in (train, test, new)] == [40, 200, 6]
    for part, per_class in ((train, 20), (test, 100), (new, 3)):
        assert sorted(e.label for e in part) == ["negative"] * per_class + ["positive"] * per_class
    texts = [{e.text for e in part} for part in (train, test, new)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert "MIT License" in (DEMO_DATA / "LICENSE").read_text()
    assert "Socher" in (DEMO_DATA / "README.md").read_text()


def test_the_whole_flow_on_a_tiny_model(model_dir, tmp_path):
    from savpack.models import load_model
    from savpack.pipeline import classify

    lines: list[str] = []
    result = run_demo(tmp_path, model=str(model_dir("gemma3_text")), echo=lines.append)
    output = "\n".join(lines)
    pack = Pack.load(tmp_path / "sst2-sentiment.safetensors")
    assert result["examples"] == 200 and pack.metrics["held_out_examples"] == 200  # recorded in the pack
    assert f"Result: {result['accuracy']:.3f} accuracy on 200 held-out sentences" in output
    for method in ("SAV pack (k=16)", "zero-shot", "kNN k=1", "kNN k=5", "linear probe", "best 2 layers", "all heads"):
        assert method in output, method
    # The bundle holds this pack, and savpack-run (a child process, no torch) gave the builder's labels.
    bundle = Bundle.load(tmp_path / "bundle")
    assert bundle.packs[0].pack.to_bytes() == pack.to_bytes() and result["exported"]
    new = load_examples(DEMO_DATA / "new.jsonl")
    builder = classify(load_model(result["model"], device="cpu"), pack, new, progress=False)
    assert result["runtime_labels"] == builder.labels and len(re.findall(r"p \d\.\d\d \( ?\d+/\d+ heads\)", output)) == 6
    assert "SAV probabilities: ECE" in output and "chosen by cross-validation" in output
    assert "held-out accuracy" in (tmp_path / "README.md").read_text()
    assert "savpack build  --model" in output and "savpack-run classify my-bundle" in output
    # A second run builds the same pack and reuses its bundle instead of exporting it again.
    again: list[str] = []
    second = run_demo(tmp_path, model=str(model_dir("gemma3_text")), echo=again.append)
    assert not second["exported"] and "reused, not exported again" in "\n".join(again)
    assert second["accuracy"] == result["accuracy"] and second["runtime_labels"] == result["runtime_labels"]


def test_vision_keeps_the_tiny_flow_and_says_the_weights_are_random(tmp_path):
    output = run("demo", "--vision", "--workdir", tmp_path)
    assert "RANDOM" in output and "accuracy" in output and "savpack build --model" in output
    assert Pack.load(tmp_path / "colour.pack.safetensors").k == 20


@pytest.mark.skipif(not os.environ.get("SAVPACK_SLOW_TESTS"), reason="real Gemma-3-270M: minutes and 5 GB; SAVPACK_SLOW_TESTS=1 runs it")
def test_the_real_demo_shows_a_real_classifier(tmp_path):
    output = run("demo", "--workdir", tmp_path)
    accuracy = float(re.search(r"Result: ([0-9.]+) accuracy on 200 held-out sentences", output).group(1))
    assert accuracy >= 0.7  # measured 0.805; chance is 0.5
    assert Pack.load(tmp_path / "sst2-sentiment.safetensors").metrics["held_out_accuracy"] == pytest.approx(accuracy, abs=5e-4)
