"""savpack-run: classify a JSONL file with a bundle; bad input gives one clear line, never a traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from savpack_runtime import graph_inputs
from savpack_runtime.bundle import Bundle
from savpack_runtime.cli import main
from savpack_runtime.errors import InputError

import golden


def test_classify_prints_the_builders_labels_as_json(capsys):
    case = "qwen2_vl"
    code = main(["classify", str(golden.bundle_dir(case)), "--data", str(golden.case_dir(case) / "items.jsonl"),
                 "--json", "--threads", "1"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = golden.expected(case)["packs"]
    assert [line["label"] for line in lines] == expected["colour"]["labels"]
    assert [line["packs"]["colour-loo"]["label"] for line in lines] == expected["colour-loo"]["labels"]
    assert lines[0]["source"].endswith("items.jsonl:1")
    assert set(lines[0]["votes"]) == {"blue", "green", "red"}


def test_classify_table_and_info(capsys):
    case = "qwen2"
    assert main(["classify", str(golden.bundle_dir(case)), "--data", str(golden.case_dir(case) / "items.jsonl")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 5 and all("words=" in line for line in table)
    assert main(["info", str(golden.bundle_dir(case)), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["graph"]["kind"] == "text" and info["packs"][0]["name"] == "words"


@pytest.mark.parametrize("content, words", [
    ('{"text": "a", "image": "missing.png"}\n', "missing.png does not exist"),
    ("not json\n", ":1: line is not valid JSON"),
    ('{"text": 3}\n', "field 'text' must be a string"),
    ("\n", "holds no examples"),
    ('{"text": "a", "video": "clip.mp4"}\n', "videos are a builder feature"),
])
def test_bad_items_give_one_line(tmp_path, capsys, content, words):
    data = tmp_path / "items.jsonl"
    data.write_text(content)
    assert main(["classify", str(golden.bundle_dir("qwen2")), "--data", str(data)]) == 1
    error = capsys.readouterr().err
    assert words in error and "Traceback" not in error


def test_items_must_fit_the_bundles_prompt(tmp_path, capsys):
    data = tmp_path / "items.jsonl"
    data.write_text('{"text": "no picture here"}\n')
    assert main(["classify", str(golden.bundle_dir("qwen2_vl")), "--data", str(data)]) == 1
    assert "takes 1 image(s); the item has none" in capsys.readouterr().err


def test_missing_bundle(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: bundle folder does not exist" in capsys.readouterr().err


def test_planner_refuses_inconsistent_inputs():
    batch = golden.recorded_batches("qwen2_vl")["all"]
    config = Bundle.load(golden.bundle_dir("qwen2_vl")).graph["plan"]
    graph_inputs.plan("qwen2_vl", config, batch)
    with pytest.raises(InputError, match="pixel_values holds"):
        graph_inputs.plan("qwen2_vl", config, {**batch, "pixel_values": batch["pixel_values"][:-4]})
    fewer_tokens = np.where(batch["input_ids"] == config["image_token_id"], 0, batch["input_ids"])
    with pytest.raises(InputError, match="input_ids hold 0 image tokens"):
        graph_inputs.plan("qwen2_vl", config, {**batch, "input_ids": fewer_tokens, "mm_token_type_ids": fewer_tokens * 0})
    with pytest.raises(InputError, match="lack 'pixel_values'"):
        graph_inputs.plan("qwen2_vl", config, {key: value for key, value in batch.items() if key != "pixel_values"})
    with pytest.raises(InputError, match="rank-2 integer"):
        graph_inputs.plan("text", {}, {"input_ids": batch["input_ids"].astype(np.float32), "attention_mask": batch["attention_mask"]})

    llava = golden.recorded_batches("llava")["all"]
    llava_config = Bundle.load(golden.bundle_dir("llava")).graph["plan"]
    assert list(graph_inputs.plan("llava", llava_config, llava)) == ["input_ids", "attention_mask", "pixel_values"]
    with pytest.raises(InputError, match="the vision tower takes 28x28"):
        graph_inputs.plan("llava", llava_config, {**llava, "pixel_values": llava["pixel_values"][:, :, :14]})
    with pytest.raises(InputError, match="image tokens but the images give"):
        graph_inputs.plan("llava", llava_config, {**llava, "pixel_values": llava["pixel_values"][:-1]})
