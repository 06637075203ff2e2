"""Datasets: every format reads the same examples; every bad input is a DataError naming file, line and field."""

import json
import warnings

import pytest
from PIL import Image

from savpack.data import Example, dataset_summary, load_examples, sample_shots
from savpack.errors import DataError
from savpack_runtime.errors import SavpackWarning


def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def picture(tmp_path):
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "red.png")
    return "red.png"


def test_formats_agree(tmp_path, picture):
    records = [{"question": "what colour", "image": picture, "label": "red"}, {"text": "plain", "label": "none"}]
    jsonl = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    as_json = write(tmp_path / "d.json", json.dumps(records))
    csv = write(tmp_path / "d.csv", f"question,image,label\nwhat colour,{picture},red\nplain,,none\n")
    expected = [Example("what colour", (str(tmp_path / picture),), "red"), Example("plain", (), "none")]
    for path in (jsonl, as_json, csv):
        got = [Example(e.text, e.images, e.label) for e in load_examples(path)]
        assert got == expected, path
    assert load_examples(jsonl)[1].source == f"{jsonl}:2"


def test_image_list_and_folder_layout(tmp_path, picture):
    data = write(tmp_path / "d.jsonl", json.dumps({"text": "two", "images": [picture, picture], "label": "x"}) + "\n")
    assert len(load_examples(data)[0].images) == 2
    for label in ("ants", "bees"):
        (tmp_path / "root" / label).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "root" / label / "1.jpg")
    (tmp_path / "root" / "bees" / "note.txt").write_text("a bee text\n")
    examples = load_examples(tmp_path / "root")
    assert [(e.label, bool(e.images), e.text) for e in examples] == [("ants", True, ""), ("bees", True, ""), ("bees", False, "a bee text")]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok", "label": "a"', r"d.jsonl:1: line is not valid JSON"),
        ('{"text": "ok"}', r"d.jsonl:1: field 'label' is missing"),
        ('{"text": "ok", "label": 3}', r"d.jsonl:1: field 'label' must be a string, got int 3"),
        ('{"text": "ok", "label": " "}', r"d.jsonl:1: field 'label' is empty"),
        ('{"text": "   ", "label": "a"}', r"d.jsonl:1: item has no text .* and no image"),
        ('{"text": 5, "label": "a"}', r"d.jsonl:1: field 'text' must be a string"),
        ('{"text": "ok", "image": "gone.png", "label": "a"}', r"d.jsonl:1: field 'image': image file .*gone.png does not exist"),
        ('["text", "label"]', r"d.jsonl:1: expected an object"),
    ],
)
def test_bad_lines(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        load_examples(write(tmp_path / "d.jsonl", line + "\n"))


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="dataset does not exist"):
        load_examples(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="unknown dataset format '.xlsx'"):
        load_examples(write(tmp_path / "d.xlsx", "x"))
    with pytest.raises(DataError, match=r"d.parquet: cannot read as Parquet: .*footer"):
        load_examples(write(tmp_path / "d.parquet", "x"))
    with pytest.raises(DataError, match="holds no examples"):
        load_examples(write(tmp_path / "empty.jsonl", "\n"))
    with pytest.raises(DataError, match="not UTF-8"):
        (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "a"}\n')
        load_examples(tmp_path / "latin.jsonl")


def test_labels_differing_in_case_and_duplicates_warn(tmp_path):
    lines = [{"text": "a", "label": "Spam"}, {"text": "b", "label": "spam "}, {"text": "a", "label": "Spam"}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_examples(write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in lines)))
    messages = [str(w.message) for w in caught if issubclass(w.category, SavpackWarning)]
    assert any("differ only in case or whitespace" in m for m in messages)
    assert any("1 duplicate example" in m for m in messages)


def test_shots_sampling_is_seeded_and_checked():
    labels = ["a"] * 5 + ["b"] * 3
    chosen, rest = sample_shots(labels, 2, seed=7)
    assert chosen == sample_shots(labels, 2, seed=7)[0] and sorted(chosen + rest) == list(range(8))
    assert sorted(labels[i] for i in chosen) == ["a", "a", "b", "b"]
    with pytest.raises(DataError, match="--shots 4 is more than class 'b' has \\(3 examples\\)"):
        sample_shots(labels, 4, seed=0)


def test_shots_sampling_can_take_a_small_class_whole():
    labels = ["a"] * 5 + ["b"] * 3
    chosen, _ = sample_shots(labels, 4, seed=0, fewer_ok=True)
    assert sorted(labels[i] for i in chosen) == ["a"] * 4 + ["b"] * 3
    # the classes with enough examples draw exactly as without fewer_ok
    assert sample_shots(labels, 2, seed=3, fewer_ok=True) == sample_shots(labels, 2, seed=3)


def test_dataset_summary_depends_on_content_and_order(tmp_path, picture):
    first, second = Example("x", (), "a"), Example("y", (), "b")
    summary = dataset_summary([first.digest(), second.digest()], ["a", "b"])
    assert summary["class_counts"] == {"a": 1, "b": 1} and summary["examples"] == 2
    assert summary["sha256"] != dataset_summary([second.digest(), first.digest()], ["b", "a"])["sha256"]
    image_path = str(tmp_path / picture)
    before = Example("x", (image_path,), "a").digest()
    Image.new("RGB", (8, 8), (0, 0, 200)).save(image_path)  # same path, other picture
    assert Example("x", (image_path,), "a").digest() != before


def test_parquet_rows_read_as_jsonl_lines(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    picture = tmp_path / "p.png"
    Image.new("RGB", (4, 4)).save(picture)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["one", " two "], "images": [[], ["p.png"]], "label": ["a", "b"], "extra": [1, 2]}),
                   path, row_group_size=1)
    examples = load_examples(path)
    assert [(e.text, e.images, e.label, e.source) for e in examples] == [
        ("one", (), "a", f"{path}[0]"), ("two", (str(picture),), "b", f"{path}[1]")]
    pq.write_table(pa.table({"id": [1]}), tmp_path / "nothing.parquet")
    with pytest.raises(DataError, match=r"nothing.parquet: no text or image column \(looked for text, question, images, image\)"):
        load_examples(tmp_path / "nothing.parquet")
    pq.write_table(pa.table({"text": ["x"], "image": ["../gone.png"]}), tmp_path / "gone.parquet")
    with pytest.raises(DataError, match=r"gone.parquet\[0\]: field 'image': image file .*gone.png does not exist"):
        load_examples(tmp_path / "gone.parquet", require_labels=False)
