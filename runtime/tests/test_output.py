"""--out: one row per item from the one result record; Parquet columns follow whatever the record holds."""

from __future__ import annotations

import json

import pytest

pq = pytest.importorskip("pyarrow.parquet", reason="needs the parquet extra")

import golden  # noqa: E402
from savpack_runtime.cli import main  # noqa: E402
from savpack_runtime.errors import OutputPathError  # noqa: E402
from savpack_runtime.output import flat_row, write_results  # noqa: E402


def test_flat_row_takes_every_field_of_the_record_even_new_ones():
    record = {"label": "a", "votes": {"a": 2, "b": 1}, "shares": {"a": 0.666667, "b": 0.333333},
              "probabilities": {"a": 0.9, "b": 0.1}, "abstained": False,
              "packs": {"p1": {"label": "a", "votes": {"a": 2, "b": 1}}, "p2": {"label": "y", "votes": {"x": 0, "y": 3}}}}
    row = flat_row("f.jsonl:3", record)
    assert row == {"source": "f.jsonl:3", "label": "a", "votes.a": 2, "votes.b": 1, "shares.a": 0.666667,
                   "shares.b": 0.333333, "probabilities.a": 0.9, "probabilities.b": 0.1, "abstained": False,
                   "packs.p1.label": "a", "packs.p1.votes.a": 2, "packs.p1.votes.b": 1,
                   "packs.p2.label": "y", "packs.p2.votes.x": 0, "packs.p2.votes.y": 3}
    with pytest.raises(OutputPathError, match=r"f.jsonl:3: result field 'votes.a.b' appears twice"):
        flat_row("f.jsonl:3", {"votes": {"a.b": 1, "a": {"b": 2}}})


def test_parquet_and_jsonl_out_hold_the_same_rows(tmp_path, capsys):
    bundle, data = golden.bundle_dir("qwen2_vl"), golden.case_dir("qwen2_vl") / "items.jsonl"
    assert main(["classify", str(bundle), "--data", str(data), "--json", "--threads", "1"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for name in ("out.jsonl", "out.parquet"):
        assert main(["classify", str(bundle), "--data", str(data), "--out", str(tmp_path / name), "--threads", "1"]) == 0
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == printed
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert rows == [flat_row(record.pop("source"), record) for record in printed]
    assert {"packs.colour-loo.label", "packs.colour.votes.red"} <= set(rows[0])
    # An existing output is kept unless --force.
    assert main(["classify", str(bundle), "--data", str(data), "--out", str(tmp_path / "out.jsonl")]) == 1
    assert "exists; pass --force" in capsys.readouterr().err


def test_rows_in_batches_share_one_schema(tmp_path):
    batches = [[("a:1", {"label": "x", "votes": {"x": 1}})], [("a:2", {"label": "y", "votes": {"x": 0}})]]
    assert write_results(tmp_path / "r.parquet", batches) == 2
    assert pq.read_table(tmp_path / "r.parquet").column("votes.x").to_pylist() == [1, 0]
    with pytest.raises(OutputPathError, match="a:2: result columns"):
        write_results(tmp_path / "s.parquet", [batches[0], [("a:2", {"label": "y"})]])
    assert not (tmp_path / "s.parquet").exists()
