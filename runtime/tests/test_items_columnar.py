"""The data people have: Parquet files and Hugging Face datasets (saved folders, the hub), image columns as bytes or
paths, column mapping. Same examples, same named errors as JSONL."""

from __future__ import annotations

import io
import json
import sys

import pytest
from PIL import Image

from savpack_runtime.cli import main
from savpack_runtime.errors import DataError, MissingExtraError
from savpack_runtime.images import ImageBytes, load_image
from savpack_runtime.items import Fields, load_examples, read_items

import golden

pyarrow = pytest.importorskip("pyarrow")
parquet = pytest.importorskip("pyarrow.parquet")

RECORDS = [{"text": "the red sun is here", "label": "warm"}, {"text": "a blue ice", "label": "cold"},
           {"text": "one more sun", "label": "warm"}]


def png(rgb: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_parquet(path, columns: dict, metadata: dict | None = None):
    table = pyarrow.table(columns)
    if metadata is not None:
        table = table.replace_schema_metadata({b"huggingface": json.dumps(metadata).encode()})
    parquet.write_table(table, path)
    return path


def content(examples):
    """What the model sees of each example, and the digest that identifies it (media compared by their bytes)."""
    return [(e.text, e.label, e.digest(), [load_image(image).tobytes() for image in e.images]) for e in examples]


def test_parquet_gives_the_examples_and_digests_jsonl_gives(tmp_path):
    jsonl = load_examples(write_jsonl(tmp_path / "d.jsonl", RECORDS))
    columns = {key: [record[key] for record in RECORDS] for key in ("text", "label")}
    from_parquet = load_examples(write_parquet(tmp_path / "d.parquet", columns))
    assert content(from_parquet) == content(jsonl)
    assert [example.source for example in from_parquet] == [f"{tmp_path / 'd.parquet'}[{i}]" for i in range(3)]


def test_column_mapping_in_every_format(tmp_path):
    records = [{"sentence": r["text"], "class_name": r["label"], "text": f"other {i}"} for i, r in enumerate(RECORDS)]
    fields = Fields(text="sentence", label="class_name")
    expected = [(r["text"], r["label"]) for r in RECORDS]
    files = [write_jsonl(tmp_path / "d.jsonl", records), tmp_path / "d.csv",
             write_parquet(tmp_path / "d.parquet", {key: [r[key] for r in records] for key in records[0]})]
    (tmp_path / "d.csv").write_text("sentence,class_name,text\n" + "".join(f"{r['sentence']},{r['class_name']},{r['text']}\n" for r in records))
    for path in files:
        assert [(e.text, e.label) for e in load_examples(path, fields=fields)] == expected, path
    # Without the mapping, the default names are read: here the other column.
    assert [e.text for e in load_examples(files[0], require_labels=False)] == ["other 0", "other 1", "other 2"]


def test_image_bytes_and_paths_in_parquet_equal_files(tmp_path):
    red, blue = png((200, 0, 0)), png((0, 0, 200), (5, 7))
    (tmp_path / "blue.png").write_bytes(blue)
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "image": "red.png", "label": "red"},
                                              {"text": "b", "image": "blue.png", "label": "blue"}])
    (tmp_path / "red.png").write_bytes(red)
    # The `datasets` Image feature stores {"bytes", "path"}; a plain binary column and a path column work too.
    as_struct = write_parquet(tmp_path / "struct.parquet", {
        "text": ["a", "b"], "label": ["red", "blue"],
        "image": [{"bytes": red, "path": None}, {"bytes": None, "path": "blue.png"}]})
    as_binary = write_parquet(tmp_path / "binary.parquet", {"text": ["a", "b"], "label": ["red", "blue"],
                                                             "picture": [red, blue]})
    expected = content(load_examples(jsonl))
    assert content(load_examples(as_struct)) == expected
    from_binary = load_examples(as_binary, fields=Fields(image="picture"))
    assert content(from_binary) == expected
    assert isinstance(from_binary[0].images[0], ImageBytes)
    assert str(from_binary[0].images[0]) == f"{as_binary}[0]: field 'picture'"
    # The runtime hands the bytes to its classifier as they are.
    assert read_items(as_binary, Fields(image="picture"))[1][1]["images"][0].data == blue


def test_datasets_classlabel_names_and_unlabelled_rows(tmp_path):
    metadata = {"info": {"features": {"text": {"dtype": "string", "_type": "Value"},
                                      "label": {"names": ["neg", "pos"], "_type": "ClassLabel"}}}}
    path = write_parquet(tmp_path / "d.parquet", {"text": ["bad", "good", "unknown"], "label": [0, 1, -1]}, metadata)
    assert [e.label for e in load_examples(path, require_labels=False)] == ["neg", "pos", None]
    with pytest.raises(DataError, match=r"d.parquet\[2\]: field 'label' is null; every example needs its class"):
        load_examples(path)
    bad = write_parquet(tmp_path / "bad.parquet", {"text": ["x"], "label": [7]}, metadata)
    with pytest.raises(DataError, match=r"bad.parquet\[0\]: field 'label': class id 7 is outside the ClassLabel's 2 names"):
        load_examples(bad)


@pytest.mark.parametrize("columns, fields, message", [
    ({"text": ["a"], "label": ["x"]}, Fields(text="sentence"),
     r"d.parquet: no column 'sentence' \(--text-field\); its columns: text, label"),
    ({"text": ["a"], "label": ["x"]}, Fields(label="y"), r"no column 'y' \(--label-field\)"),
    ({"body": ["a"], "label": ["x"]}, Fields(),
     r"d.parquet: no text or image column \(looked for text, question, images, image\); its columns: body, label; "
     r"choose one with --text-field or --image-field"),
    ({"text": ["a"], "label": [3]}, Fields(),
     r"d.parquet\[0\]: field 'label' must be a string, got int 3; labels are class names"),
    ({"text": [5], "label": ["x"]}, Fields(), r"d.parquet\[0\]: field 'text' must be a string, got int"),
    ({"text": ["a"], "image": [3]}, Fields(),
     r"d.parquet\[0\]: field 'image' must be a path, encoded image bytes, or a list of them"),
    ({"text": ["a"], "image": ["nowhere.png"]}, Fields(), r"d.parquet\[0\]: field 'image': image file .*nowhere.png does not exist"),
    ({"text": [None], "label": ["x"]}, Fields(), r"d.parquet\[0\]: item has no text"),
])
def test_bad_columns_get_named_errors(tmp_path, columns, fields, message):
    path = write_parquet(tmp_path / "d.parquet", columns)
    with pytest.raises(DataError, match=message):
        load_examples(path, fields=fields)


def test_bad_files_and_mappings_get_named_errors(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken.parquet: cannot read as Parquet"):
        load_examples(tmp_path / "broken.parquet")
    jsonl = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    with pytest.raises(DataError, match=r"d.jsonl: no item has field 'sentence' \(--text-field\); its fields: label, text"):
        load_examples(jsonl, fields=Fields(text="sentence"))
    (tmp_path / "root" / "a").mkdir(parents=True)
    (tmp_path / "root" / "a" / "1.txt").write_text("hi")
    with pytest.raises(DataError, match=r"root: a folder root/<label>/<file> has no columns to map; --label-field"):
        load_examples(tmp_path / "root", fields=Fields(label="x"))
    with pytest.raises(DataError, match=r"unknown dataset format '.xlsx'; use .jsonl, .json, .csv, .tsv, .parquet"):
        (tmp_path / "d.xlsx").write_text("x")
        load_examples(tmp_path / "d.xlsx")


def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "d.parquet", {"text": ["a"]})
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now fails as if pyarrow were not installed
    with pytest.raises(MissingExtraError, match=r"^Parquet needs pyarrow: pip install 'savpack-runtime\[parquet\]' "
                                                r"\(or 'savpack\[parquet\]' with the builder\)$"):
        load_examples(path)
    monkeypatch.setitem(sys.modules, "datasets", None)
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("state.json", "dataset_info.json"):
        (saved / name).write_text("{}")
    with pytest.raises(MissingExtraError, match=r"reading a saved Hugging Face dataset needs datasets: pip install 'savpack-runtime\[datasets\]'"):
        load_examples(saved)


datasets = pytest.importorskip("datasets")


def saved_dataset(folder, columns: dict, features=None):
    dataset = datasets.Dataset.from_dict(columns, features=features)
    dataset.save_to_disk(str(folder))
    return folder


def test_a_saved_dataset_folder_gives_the_examples_jsonl_gives(tmp_path):
    red = png((200, 0, 0))
    (tmp_path / "red.png").write_bytes(red)
    jsonl = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"text": "a b", "image": "red.png", "label": "pos"},
                                                             {"text": "c", "image": "red.png", "label": "neg"}]))
    features = datasets.Features({"sentence": datasets.Value("string"), "image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    folder = saved_dataset(tmp_path / "saved", {"sentence": ["a b", "c"], "image": [{"bytes": red, "path": None}] * 2,
                                                "label": [1, 0]}, features)
    from_disk = load_examples(folder, fields=Fields(text="sentence"))
    assert content(from_disk) == content(jsonl)
    assert from_disk[0].source == f"{folder}[0]"
    # A DatasetDict folder names its splits; each split's folder reads.
    datasets.DatasetDict({"train": datasets.load_from_disk(str(folder)), "test": datasets.load_from_disk(str(folder))}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"dict: a saved DatasetDict with splits test, train; give one split's folder, e.g. .*dict/test"):
        load_examples(tmp_path / "dict")
    assert len(load_examples(tmp_path / "dict" / "train", fields=Fields(text="sentence"))) == 2


def test_a_hub_dataset_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hf:savpack-tests/nothing-here:train: cannot load from the Hugging Face Hub \(no network"):
        load_examples("hf:savpack-tests/nothing-here:train")
    with pytest.raises(DataError, match=r"hf:a:b:c:d: expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT"):
        load_examples("hf:a:b:c:d")


def test_runtime_cli_classifies_parquet_with_mapped_columns_like_jsonl(tmp_path, capsys):
    texts = ["the red sun is here", "a blue ice"]
    jsonl = write_jsonl(tmp_path / "items.jsonl", [{"text": text} for text in texts])
    table = write_parquet(tmp_path / "items.parquet", {"body": texts, "id": [1, 2]})
    bundle = str(golden.bundle_dir("qwen2"))
    assert main(["classify", bundle, "--data", str(jsonl), "--json", "--threads", "1"]) == 0
    from_jsonl = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["classify", bundle, "--data", str(table), "--text-field", "body", "--json", "--threads", "1"]) == 0
    from_parquet = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row.pop("source") for row in from_parquet] == [f"{table}[0]", f"{table}[1]"]
    assert from_parquet == [{key: value for key, value in row.items() if key != "source"} for row in from_jsonl]
    assert main(["classify", bundle, "--data", str(table)]) == 1
    assert "no text or image column" in capsys.readouterr().err
