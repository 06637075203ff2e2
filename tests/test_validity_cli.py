"""The CLI around baselines, ablations, head maps and GGUF conversion, on the BERT and Qwen2 fixtures."""

from __future__ import annotations

import builtins
import json
import os

import pytest
from click.testing import CliRunner
from PIL import Image

from savpack.cli import main
from savpack_runtime import Pack


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def bert_pack(model_dir, text_task, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert-cli")
    pack = folder / "pack.safetensors"
    run("build", "--model", model_dir("bert"), "--data", text_task[0], "--out", pack, "--k", "6", "--shots", "6")
    return pack


def test_bert_build_classify_eval_inspect(bert_pack, model_dir, text_task, tmp_path):
    pack = Pack.load(bert_pack)
    assert pack.model["family"] == "bert" and pack.token_position == "first" and pack.k == 6
    umask = os.umask(0)
    os.umask(umask)
    assert bert_pack.stat().st_mode & 0o777 == 0o666 & ~umask  # shareable, not mkstemp's private 0600
    lines = run("classify", "--pack", bert_pack, "--model", model_dir("bert"), "--data", text_task[1]).stdout.strip().splitlines()
    assert len(lines) == 12 and all(json.loads(line)["label"] in pack.labels for line in lines)
    report = json.loads(run("eval", "--pack", bert_pack, "--model", model_dir("bert"), "--data", text_task[1], "--json").stdout)
    assert report["examples"] + report["skipped_training_examples"] == 12
    plot = tmp_path / "heads.png"
    shown = run("inspect", bert_pack, "--plot", plot).output
    assert "k = 6" in shown and Image.open(plot).size[0] > 100
    assert run("inspect", bert_pack, "--plot", plot, ok=False).exit_code == 1  # exists: needs --force
    run("inspect", bert_pack, "--plot", plot, "--force")


def test_eval_baselines_from_the_same_examples(bert_pack, model_dir, text_task):
    args = ["eval", "--pack", bert_pack, "--model", model_dir("bert"), "--data", text_task[1], "--baselines"]
    report = json.loads(run(*args, "--train", text_task[0], "--json").stdout)
    plain = json.loads(run("eval", "--pack", bert_pack, "--model", model_dir("bert"), "--data", text_task[1], "--json").stdout)
    assert report["accuracy"] == plain["accuracy"] and report["confusion"] == plain["confusion"]  # SAV row unchanged
    assert set(report["baselines"]) == {"knn_1", "knn_5", "linear_probe", "best_2_layers", "all_heads"}
    assert "no language-model head" in report["baselines_skipped"]["zero_shot"]
    table = run(*args, "--train", text_task[0]).output
    assert "SAV pack (k=6)" in table and "linear probe" in table
    alone = json.loads(run(*args, "--json").stdout)
    assert alone["baselines"] == {} and "--train" in alone["baselines_skipped"]["knn_1"]
    assert "go with --baselines" in run("eval", "--pack", bert_pack, "--model", model_dir("bert"), "--data", text_task[1],
                                        "--train", text_task[0], ok=False).output


def test_eval_baselines_zero_shot_and_train_activations(model_dir, text_task, tmp_path):
    model = model_dir("qwen2")
    pack, acts = tmp_path / "pack.safetensors", tmp_path / "acts.safetensors"
    prompt = "Text: {text}\nKind:"
    run("extract", "--model", model, "--data", text_task[0], "--out", acts, "--hidden", "--prompt", prompt)
    run("build", "--activations", acts, "--out", pack, "--k", "4")
    words = ["--verbalizer", "warm=red", "--verbalizer", "cold=blue", "--verbalizer", "shape=circle"]
    report = json.loads(run("eval", "--pack", pack, "--model", model, "--data", text_task[1], "--baselines",
                            "--train-activations", acts, *words, "--json").stdout)
    assert set(report["baselines"]) == {"zero_shot", "knn_1", "knn_5", "linear_probe", "best_2_layers", "all_heads"}
    assert report["baselines_skipped"] == {}
    bad = run("eval", "--pack", pack, "--model", model, "--data", text_task[1], "--baselines", "--verbalizer", "warm", ok=False)
    assert "LABEL=WORD" in bad.output
    unknown = run("eval", "--pack", pack, "--model", model, "--data", text_task[1], "--baselines", "--verbalizer", "hot=red", ok=False)
    assert "not labels of the pack" in unknown.output


def test_ablate_from_cached_activations(model_dir, text_task, tmp_path):
    model = model_dir("qwen2")
    train, test = tmp_path / "train.safetensors", tmp_path / "test.safetensors"
    run("extract", "--model", model, "--data", text_task[0], "--out", train)
    run("extract", "--model", model, "--data", text_task[1], "--out", test)
    output = run("ablate", "--train", train, "--test", test, "--shots", "2,4", "--k", "1,5,all", "--seeds", "0,1").output
    rows = [line for line in output.splitlines() if line.strip().startswith(("2 ", "4 "))]
    assert len(rows) == 2 * 2 * 3 * 3 and "+-" in rows[0]  # shots x scorings x votes (majority, cosine, weighted) x k
    runs = json.loads(run("ablate", "--train", train, "--test", test, "--shots", "4", "--k", "all", "--scoring", "loo",
                          "--vote", "cosine", "--seeds", "3", "--json").stdout)
    assert [(r["shots"], r["k"], r["scoring"], r["vote"], r["seed"]) for r in runs] == [(4, "all", "loo", "cosine", 3)]
    assert "too small" in run("ablate", "--train", train, "--test", test, "--k", "0", ok=False).output
    assert "exceeds" in run("ablate", "--train", train, "--test", test, "--shots", "50", ok=False).output


def test_plot_without_matplotlib_is_a_clear_error(bert_pack, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    result = run("inspect", bert_pack, "--plot", tmp_path / "heads.png", ok=False)
    assert result.exit_code == 1 and "pip install 'savpack[plot]'" in result.output
    assert not (tmp_path / "heads.png").exists()


def test_convert_gguf_refuses_bad_paths(tmp_path):
    missing = run("convert-gguf", tmp_path / "none.gguf", "--out", tmp_path / "out", ok=False)
    assert missing.exit_code == 2 and "does not exist" in missing.output
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "out").mkdir()
    assert "exists" in run("convert-gguf", tmp_path / "model.gguf", "--out", tmp_path / "out", ok=False).output
    broken = run("convert-gguf", tmp_path / "model.gguf", "--out", tmp_path / "new", ok=False)
    assert broken.exit_code == 1 and "model.gguf" in broken.output and not (tmp_path / "new").exists()
