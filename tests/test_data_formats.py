"""The data people have, through the builder: the same items as JSONL, Parquet or a saved `datasets` folder give the
same activations; image bytes in Parquet equal the image files; every data command maps columns; classify --out."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from savpack.cli import main
from savpack.extract import ActivationSet
from savpack_runtime.items import Fields, load_examples
from savpack_runtime.output import flat_row

pyarrow = pytest.importorskip("pyarrow")
parquet = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def records_of(jsonl):
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def as_parquet(records, path, rename=None, image_bytes_from=None):
    """The records as a Parquet table; `rename` maps field names; images become their bytes when asked."""
    rename = rename or {}
    columns: dict[str, list] = {}
    for record in records:
        for key, value in record.items():
            if image_bytes_from is not None and key == "image":
                value = (image_bytes_from / value).read_bytes()
            columns.setdefault(rename.get(key, key), []).append(value)
    parquet.write_table(pyarrow.table(columns), path)
    return path


def test_parquet_and_a_saved_dataset_give_the_activations_jsonl_gives(model_dir, text_task, tmp_path):
    model, (train, _) = model_dir("qwen2"), text_task
    records = records_of(train)
    table = as_parquet(records, tmp_path / "train.parquet", rename={"text": "sentence", "label": "category"})
    names = sorted({record["label"] for record in records})
    dataset = datasets.Dataset.from_dict(
        {"text": [r["text"] for r in records], "label": [names.index(r["label"]) for r in records]},
        features=datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}))
    dataset.save_to_disk(str(tmp_path / "saved"))

    run("extract", "--model", model, "--data", train, "--out", tmp_path / "jsonl.safetensors")
    run("extract", "--model", model, "--data", table, "--text-field", "sentence", "--label-field", "category",
        "--out", tmp_path / "parquet.safetensors")
    run("extract", "--model", model, "--data", tmp_path / "saved", "--out", tmp_path / "saved.safetensors")
    reference = ActivationSet.load(tmp_path / "jsonl.safetensors")
    for name in ("parquet", "saved"):
        other = ActivationSet.load(tmp_path / f"{name}.safetensors")
        assert other.labels == reference.labels, name
        assert other.digests == reference.digests, name  # so eval recognises training items in any format
        np.testing.assert_array_equal(other.activations, reference.activations, err_msg=name)


def test_image_bytes_in_parquet_give_the_activations_of_the_files(model_dir, colour_task, tmp_path):
    model, (train, _) = model_dir("qwen2_vl"), colour_task
    records = records_of(train)[:6]
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(json.dumps({**r, "image": str(train.parent / r["image"])}) + "\n" for r in records))
    table = as_parquet(records, tmp_path / "pictures.parquet", rename={"image": "picture"}, image_bytes_from=train.parent)
    assert isinstance(parquet.read_table(table).column("picture")[0].as_py(), bytes)
    run("extract", "--model", model, "--data", subset, "--out", tmp_path / "files.safetensors")
    run("extract", "--model", model, "--data", table, "--image-field", "picture", "--out", tmp_path / "bytes.safetensors")
    files, in_bytes = (ActivationSet.load(tmp_path / f"{name}.safetensors") for name in ("files", "bytes"))
    assert in_bytes.digests == files.digests
    np.testing.assert_array_equal(in_bytes.activations, files.activations)


def test_build_eval_classify_map_columns_and_classify_writes_parquet(model_dir, text_task, tmp_path):
    model, (train, test) = model_dir("qwen2"), text_task
    mapping = {"text": "body", "label": "tag"}
    train_table = as_parquet(records_of(train), tmp_path / "train.parquet", rename=mapping)
    test_table = as_parquet(records_of(test), tmp_path / "test.parquet", rename=mapping)
    options = ["--text-field", "body", "--label-field", "tag"]
    run("build", "--model", model, "--data", train_table, *options, "--out", tmp_path / "p.safetensors", "--k", 4)
    run("build", "--model", model, "--data", train, "--out", tmp_path / "from-jsonl.safetensors", "--k", 4)
    assert (tmp_path / "p.safetensors").read_bytes() == (tmp_path / "from-jsonl.safetensors").read_bytes()

    report = json.loads(run("eval", "--pack", tmp_path / "p.safetensors", "--model", model, "--data", test_table,
                            *options, "--baselines", "--train", train_table, "--json").stdout)
    reference = json.loads(run("eval", "--pack", tmp_path / "p.safetensors", "--model", model, "--data", test,
                               "--baselines", "--train", train, "--json").stdout)
    assert report == reference

    result = run("classify", "--pack", tmp_path / "p.safetensors", "--model", model, "--data", test_table,
                 "--text-field", "body", "--out", tmp_path / "out.parquet")
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    written = parquet.read_table(tmp_path / "out.parquet").to_pylist()
    # The runtime's writer (the one savpack-run --out uses): the record's fields as flat columns, one row per item.
    assert written == [flat_row(row.pop("source"), row) for row in printed]
    assert len(written) == len(records_of(test)) and "votes.warm" in written[0]
    assert [row["source"] for row in written] == [f"{test_table}[{i}]" for i in range(len(written))]
    run("classify", "--pack", tmp_path / "p.safetensors", "--model", model, "--data", test, "--out", tmp_path / "out.jsonl")
    from_jsonl = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [flat_row("", {k: v for k, v in row.items() if k != "source"}) for row in from_jsonl] == \
        [{**row, "source": ""} for row in written]


@pytest.mark.parametrize("args, message", [
    (["--text-field", "nope"], "no column 'nope' (--text-field); its columns: body, tag"),
    (["--label-field", "body"], "field 'body' must be a string"),
])
def test_bad_columns_are_one_line_errors_before_the_model_runs(model_dir, text_task, tmp_path, args, message):
    table = as_parquet(records_of(text_task[0]), tmp_path / "t.parquet", rename={"text": "body", "label": "tag"})
    if "--label-field" in args:  # a numeric column given as the labels
        parquet.write_table(pyarrow.table({"body": [1, 2], "text": ["a", "b"]}), table)
    result = run("build", "--model", model_dir("qwen2"), "--data", table, *args, "--out", tmp_path / "p.safetensors", ok=False)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_classify_out_refuses_a_bad_path_before_the_model_runs(text_task, tmp_path):
    result = run("classify", "--pack", tmp_path / "none.safetensors", "--model", "unused", "--data", text_task[1],
                 "--out", tmp_path / "out.csv", ok=False)
    assert "out.csv: unknown output format '.csv'" in result.output
    (tmp_path / "out.jsonl").write_text("keep me\n")
    result = run("classify", "--pack", tmp_path / "none.safetensors", "--model", "unused", "--data", text_task[1],
                 "--out", tmp_path / "out.jsonl", ok=False)
    assert "out.jsonl: exists; pass --force" in result.output and (tmp_path / "out.jsonl").read_text() == "keep me\n"


def test_fields_are_one_shared_reader_option():
    assert Fields(text="a").names("text") == ("a",) and Fields().names("image") == ("images", "image")
    assert load_examples.__module__ == "savpack_runtime.items"
