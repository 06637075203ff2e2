"""The one item reader: the runtime reads every format the builder reads, checks `<image>` markers the same way, and
refuses what its prompt rule cannot reproduce (videos, images placed by markers)."""

from __future__ import annotations

import json
import re

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


def test_files_starting_with_a_byte_order_mark_read_as_without(tmp_path):
    """Spreadsheet tools write CSV and JSONL with a UTF-8 BOM; the first field's name must not absorb it."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "d.jsonl").write_bytes(bom + b'{"text": "warm sun", "label": "warm"}\n{"text": "cold ice", "label": "cold"}\n')
    (tmp_path / "d.csv").write_bytes(bom + b"text,label\nwarm sun,warm\ncold ice,cold\n")
    (tmp_path / "d.json").write_bytes(bom + b'[{"text": "warm sun", "label": "warm"}, {"text": "cold ice", "label": "cold"}]')
    (tmp_path / "root" / "warm").mkdir(parents=True)
    (tmp_path / "root" / "warm" / "a.txt").write_bytes(bom + b"warm sun")
    for name in ("d.jsonl", "d.csv", "d.json"):
        examples = load_examples(tmp_path / name)
        assert [(example.text, example.label) for example in examples] == [("warm sun", "warm"), ("cold ice", "cold")], name
    assert load_examples(tmp_path / "root")[0].text == "warm sun"


@pytest.mark.parametrize("line, message", [
    ('{"text": "a", "label": null}', "d.jsonl:1: field 'label' is null; every example needs its class as a string"),
    ('{"text": "a"}', "d.jsonl:1: field 'label' is missing"),
    ('{"text": "a", "text": "b", "label": "x"}', "d.jsonl:1: line gives the key 'text' twice"),
    ('{"text": "a", "label": "x\\ny"}', "field 'label' 'x\\ny' holds U+000A"),
    ('{"text": "a", "label": "x\\u0000"}', "holds U+0000"),
    ('{"text": "a", "label": "x\\u2028y"}', "holds U+2028 (line separator)"),
    ('{"text": "a", "label": "\\udc80"}', "field 'label' holds invalid Unicode"),
    ('{"text": "\\ud800", "label": "x"}', "field 'text' holds invalid Unicode"),
    ('{"text": "a", "image": "https://example.com/a.png", "label": "x"}',
     "field 'image': 'https://example.com/a.png' is a URL; savpack reads local image files only"),
    ('{"text": "a", "image": "red.png", "images": ["red.png"], "label": "x"}', "gives both 'images' and 'image'; use one"),
    ('{"text": "a", "question": "b", "label": "x"}', "gives both 'text' and 'question'; use one"),
])
def test_unclear_records_get_a_message_naming_the_line_and_field(tmp_path, picture, line, message):
    (tmp_path / "d.jsonl").write_text(line + "\n")
    with pytest.raises(DataError, match=re.escape(message)):
        load_examples(tmp_path / "d.jsonl")


def test_labels_are_checked_in_folder_names_and_without_require_labels(tmp_path, picture):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "two\\nlines"}\n')
    with pytest.raises(DataError, match="holds U\\+000A"):
        read_items(tmp_path / "d.jsonl")  # labels are optional here, but a given one is still a label
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": null}\n')
    assert [item for _, item in read_items(tmp_path / "d.jsonl")] == [{"text": "a", "images": []}]  # unlabelled
    (tmp_path / "root" / "bad\tname").mkdir(parents=True)
    (tmp_path / "root" / "bad\tname" / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="folder name \\(the label\\) 'bad\\\\tname' holds U\\+0009"):
        load_examples(tmp_path / "root")


def test_data_files_are_read_with_a_bound_and_never_opened_when_not_regular(tmp_path, monkeypatch):
    import os

    from savpack_runtime import items

    os.mkfifo(tmp_path / "d.jsonl")
    with pytest.raises(DataError, match="d.jsonl: dataset is a FIFO"):
        load_examples(tmp_path / "d.jsonl")  # opening the FIFO would block forever
    monkeypatch.setattr(items, "MAX_LINE_CHARS", 64)
    (tmp_path / "long.jsonl").write_text('{"text": "a", "label": "x"}\n' + '{"text": "' + "a" * 100 + '"}\n')
    with pytest.raises(DataError, match="long.jsonl:2: line is longer than 64 characters"):
        load_examples(tmp_path / "long.jsonl")
    monkeypatch.setattr(items, "MAX_JSON_BYTES", 16)
    (tmp_path / "big.json").write_text('[{"text": "a", "label": "x"}]')
    with pytest.raises(DataError, match="big.json: JSON dataset is 29 bytes, more than the limit of 16"):
        load_examples(tmp_path / "big.json")
