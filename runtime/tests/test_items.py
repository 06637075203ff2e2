"""The one item reader: the runtime reads every format the builder reads, checks `<image>` markers the same way, and
refuses what its prompt rule cannot reproduce (videos, images placed by markers)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from savpack_runtime.cli import main
from savpack_runtime.errors import DataError, InputError
from savpack_runtime.items import load_examples, read_items

import golden


@pytest.fixture
def picture(tmp_path):
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "red.png")
    return "red.png"


def test_runtime_reads_jsonl_json_csv_tsv_and_folders_alike(tmp_path, picture):
    records = [{"question": "what colour", "image": picture, "label": "red"}, {"text": "plain"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.csv").write_text(f"question,image,label\nwhat colour,{picture},red\nplain,,none\n")
    (tmp_path / "d.tsv").write_text(f"question\timage\nwhat colour\t{picture}\nplain\t\n")
    expected = [{"text": "what colour", "images": [str(tmp_path / picture)]}, {"text": "plain", "images": []}]
    for name in ("d.jsonl", "d.json", "d.csv", "d.tsv"):
        assert [item for _, item in read_items(tmp_path / name)] == expected, name
    (tmp_path / "root" / "red").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "root" / "red" / "1.png")
    assert [item["images"] for _, item in read_items(tmp_path / "root")] == [[str(tmp_path / "root" / "red" / "1.png")]]


@pytest.mark.parametrize("record, message", [
    ({"text": "<image> and <image>?", "images": ["red.png"]}, r"d.jsonl:1: field 'text' holds 2 <image> marker\(s\) but the item gives 1 image"),
    ({"text": "left <image> right", "images": ["red.png"]}, r"d.jsonl:1: <image> markers placing images inside the text are a builder feature"),
    ({"text": "a clip", "video": "red.png"}, r"d.jsonl:1: videos are a builder feature"),
])
def test_runtime_checks_markers_and_refuses_builder_only_items(tmp_path, picture, record, message):
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message):
        read_items(tmp_path / "d.jsonl")


def test_builder_reads_the_same_file_with_markers_and_videos(tmp_path, picture):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "left <image> right", "images": [picture], "label": "a"}) + "\n")
    (example,) = load_examples(tmp_path / "d.jsonl")
    assert example.interleaved and example.media() == [("image", str(tmp_path / picture))]


def test_a_marker_in_an_api_items_text_is_refused_by_the_classifier(tmp_path):
    from savpack_runtime import Classifier

    classifier = Classifier.load(golden.bundle_dir("qwen2_vl"), threads=1)
    image = golden.items("qwen2_vl")[0]["images"][0]
    with pytest.raises(InputError, match="item 0: <image> markers placing images inside the text are a builder feature"):
        classifier.classify("left <image> right", [image])


def test_runtime_cli_classifies_a_csv_file(tmp_path, capsys):
    data = tmp_path / "items.csv"
    data.write_text("text,label\nthe red sun is here,warm\na blue ice\n")
    assert main(["classify", str(golden.bundle_dir("qwen2")), "--data", str(data), "--json", "--threads", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["source"] for line in lines] == [f"{data}:2", f"{data}:3"]
