"""The CLI end to end on tiny fixtures: extract, build (from the model or from activations), inspect, classify,
eval, demo; and errors as one-line messages."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from savpack.cli import main
from savpack_runtime import Pack


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_build_from_model_equals_build_from_activations(model_dir, text_task, tmp_path):
    model, (train, _) = model_dir("qwen2"), text_task
    run("build", "--model", model, "--data", train, "--out", tmp_path / "direct.safetensors", "--k", 6)
    run("extract", "--model", model, "--data", train, "--out", tmp_path / "acts.safetensors")
    run("build", "--activations", tmp_path / "acts.safetensors", "--out", tmp_path / "from-acts.safetensors", "--k", 6)
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "from-acts.safetensors").read_bytes()


def test_building_twice_gives_identical_bytes(model_dir, text_task, tmp_path):
    for name in ("a", "b"):
        run("build", "--model", model_dir("llama"), "--data", text_task[0], "--out", tmp_path / f"{name}.safetensors",
            "--k", 5, "--shots", 6, "--seed", 3, "--name", "test/words", "--version", "1.2.0")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    pack = Pack.load(tmp_path / "a.safetensors")
    assert pack.class_counts.tolist() == [6, 6, 6]
    assert (pack.name, pack.version, pack.selection["shots"], pack.selection["seed"]) == ("test/words", "1.2.0", 6, 3)


def test_activations_file_holds_what_it_promises(model_dir, text_task, tmp_path):
    from savpack.extract import ActivationSet

    run("extract", "--model", model_dir("llama"), "--data", text_task[0], "--out", tmp_path / "a.safetensors")
    activations = ActivationSet.load(tmp_path / "a.safetensors")
    assert activations.activations.shape == (24, 4, 8, 12)
    assert activations.labels[:2] == ["warm", "warm"] and len(activations.input_ids) == 24
    assert all(ids[0] == 1 for ids in activations.input_ids)  # llama fixture: BOS id 1 leads every prompt
    built = run("build", "--activations", tmp_path / "a.safetensors", "--out", tmp_path / "p.safetensors",
                "--k", "all", "--scoring", "loo", "--shots", 4, "--json")
    summary = json.loads(built.stdout)
    assert summary["k"] == 32 and summary["selection"]["scoring"] == "loo" and summary["dataset"]["examples"] == 12


def test_classify_prints_one_json_line_per_item_and_eval_skips_training_data(model_dir, colour_task, tmp_path):
    model, (train, test) = model_dir("qwen2_vl"), colour_task
    run("build", "--model", model, "--data", train, "--out", tmp_path / "p.safetensors", "--shots", 5)
    lines = run("classify", "--pack", tmp_path / "p.safetensors", "--model", model, "--data", test).stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 12
    assert all(sum(r["votes"].values()) == 20 and set(r["votes"]) == {"blue", "green", "red"} for r in records)
    report = json.loads(run("eval", "--pack", tmp_path / "p.safetensors", "--model", model, "--data", train, "--json").stdout)
    # 5 of 8 per class built the pack: only the other 3 per class are evaluated
    assert report["examples"] == 9 and report["skipped_training_examples"] == 15
    assert np.array(report["confusion"]).sum() == 9


@pytest.mark.parametrize(
    "args, message",
    [
        (["build", "--model", "{model}", "--data", "{missing}", "--out", "{out}"], "dataset does not exist"),
        (["build", "--model", "{model}", "--data", "{train}", "--out", "{out}", "--k", "99"], "but the model has 4 x 8 = 32"),
        (["build", "--model", "{model}", "--data", "{train}", "--out", "{out}", "--shots", "50"], "--shots 50 is more than class"),
        (["build", "--model", "{tmp}/no-such-model", "--data", "{train}", "--out", "{out}"], "no-such-model: model folder does not exist"),
        (["build", "--model", "{model}", "--data", "{train}", "--out", "{tmp}/no/dir/p.safetensors"], "does not exist"),
        (["inspect", "{train}"], "train.jsonl"),
        (["build", "--model", "{model}", "--data", "{train}", "--out", "{out}", "--device", "cuda:3"], "--device cuda:3"),
    ],
)
def test_errors_are_one_line_messages(args, message, model_dir, text_task, tmp_path):
    values = {"model": model_dir("qwen2"), "train": text_task[0], "missing": tmp_path / "missing.jsonl",
              "out": tmp_path / "p.safetensors", "tmp": tmp_path}
    result = run(*[arg.format(**values) for arg in args], ok=False)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "p.safetensors").exists()


def test_pack_for_another_model_is_refused(model_dir, text_task, tmp_path):
    run("build", "--model", model_dir("qwen2"), "--data", text_task[0], "--out", tmp_path / "p.safetensors", "--k", 4)
    from savpack.testing import build_fixture

    other = build_fixture("qwen2", tmp_path / "other-qwen2", seed=1)  # same architecture, other weights
    result = run("classify", "--pack", tmp_path / "p.safetensors", "--model", other, "--data", text_task[1], ok=False)
    assert result.exit_code == 1 and "weights of" in result.output and "differ" in result.output


def test_unknown_label_at_eval_names_the_line(model_dir, text_task, tmp_path):
    run("build", "--model", model_dir("qwen2"), "--data", text_task[0], "--out", tmp_path / "p.safetensors", "--k", 4)
    data = tmp_path / "odd.jsonl"
    data.write_text(json.dumps({"text": "red sun", "label": "warm"}) + "\n" + json.dumps({"text": "a dot", "label": "round"}) + "\n")
    result = run("eval", "--pack", tmp_path / "p.safetensors", "--model", model_dir("qwen2"), "--data", data, ok=False)
    assert "odd.jsonl:2: label 'round' is not one of the pack's labels" in result.output


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    import savpack

    assert savpack.__version__ == version("savpack")  # the code's version is the one pip installed
    assert run("--version").output == f"savpack, version {version('savpack')}\n"


def _shuffled_labels(path, out, seed=0):
    """The same texts with labels dealt at random: the classifier is unsure, so its probabilities spread out (on the
    real task the tiny fixture is right on every item, at probability 1)."""
    import random

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    labels = [row["label"] for row in rows]
    random.Random(seed).shuffle(labels)
    out.write_text("".join(json.dumps({**row, "label": label}) + "\n" for row, label in zip(rows, labels)))
    return out


def test_classify_gives_calibrated_probabilities_and_abstains_below_the_threshold(model_dir, text_task, tmp_path):
    model, test = model_dir("qwen2"), text_task[1]
    train = _shuffled_labels(text_task[0], tmp_path / "noisy.jsonl")
    built = json.loads(run("build", "--model", model, "--data", train, "--out", tmp_path / "p.safetensors", "--k", 6,
                           "--classifier", "vote", "--json").stdout)
    assert built["format_version"] == 2 and built["scoring"]["fitted_on"] == "cross-validation"
    assert {"cv_vote_accuracy", "cv_folds"} <= set(built["metrics"])
    records = [json.loads(line) for line in run("classify", "--pack", tmp_path / "p.safetensors", "--model", model,
                                                "--data", test).stdout.splitlines()]
    assert all(r["calibrated"] and abs(sum(r["probabilities"].values()) - 1) < 1e-6 for r in records)
    tops = sorted(max(r["probabilities"].values()) for r in records)
    threshold = (tops[len(tops) // 2 - 1] + tops[len(tops) // 2]) / 2
    held = [json.loads(line) for line in run("classify", "--pack", tmp_path / "p.safetensors", "--model", model,
                                             "--data", test, "--abstain-below", threshold).stdout.splitlines()]
    for free, record in zip(records, held):
        below = max(free["probabilities"].values()) < threshold
        assert record["abstained"] == below and record["label"] == (None if below else free["label"])
    assert any(r["abstained"] for r in held) and not all(r["abstained"] for r in held)
    refused = run("classify", "--pack", tmp_path / "p.safetensors", "--model", model, "--data", test,
                  "--abstain-below", "nan", ok=False)
    assert refused.exit_code == 2 and "--abstain-below" in refused.output and "Traceback" not in refused.output


def test_eval_reports_calibration_and_plots_it(model_dir, text_task, tmp_path):
    model, (train, test) = model_dir("qwen2"), text_task
    run("build", "--model", model, "--data", train, "--out", tmp_path / "p.safetensors", "--k", 6)
    out = run("eval", "--pack", tmp_path / "p.safetensors", "--model", model, "--data", test, "--json",
              "--plot", tmp_path / "calibration.png")
    calibration = json.loads(out.stdout)["calibration"]
    assert set(calibration["accuracy_at_coverage"]) == {"50%", "80%", "90%"}
    assert 0 <= calibration["ece"] <= 1 and calibration["brier"] >= 0 and calibration["log_loss"] >= 0
    assert (tmp_path / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = run("eval", "--pack", tmp_path / "p.safetensors", "--model", model, "--data", test).stdout
    assert "ECE (15 bins)" in text and "accuracy at coverage" in text


def test_probe_packs_and_calibration_files_from_the_cli(model_dir, text_task, tmp_path):
    model, (train, test) = model_dir("qwen2"), text_task
    run("build", "--model", model, "--data", train, "--out", tmp_path / "probe.safetensors", "--k", 6,
        "--classifier", "probe")
    pack = Pack.load(tmp_path / "probe.safetensors")
    assert pack.classifier == "probe" and pack.probe_weight.shape == (3, 6 * pack.grid[2])
    run("build", "--model", model, "--data", train, "--out", tmp_path / "cal.safetensors", "--k", 6,
        "--calibration", test)
    assert Pack.load(tmp_path / "cal.safetensors").scoring["fitted_on"] == "calibration-data"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "red sun", "label": "hot"}) + "\n")
    refused = run("build", "--model", model, "--data", train, "--out", tmp_path / "x.safetensors", "--calibration", bad,
                  ok=False)
    assert refused.exit_code == 1 and "'hot'" in refused.output and not (tmp_path / "x.safetensors").exists()
