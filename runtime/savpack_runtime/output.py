"""Write classification results to a file: one row per input, in input order, with its source, as JSONL or Parquet
(chosen by the file's suffix). One writer for every consumer (savpack classify, savpack-run classify, the Ray engine):
a row is `{"source": ..., **Result.to_dict()}`, so fields a later record gains (probabilities, abstained) come along.

Parquet (extra `parquet`): `votes`, `shares` (and `probabilities`) become struct columns with one field per label,
`packs` a struct per pack; the file is written atomically, like every output of savpack.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from .errors import OutputPathError
from .files import atomic_write, check_output_path
from .items import JSONL_SUFFIXES, PARQUET_SUFFIXES, _optional

RESULT_FORMATS = {**{suffix: "jsonl" for suffix in JSONL_SUFFIXES}, **{suffix: "parquet" for suffix in PARQUET_SUFFIXES}}


def results_format(path: str | os.PathLike, force: bool = False) -> str:
    """"jsonl" or "parquet" for an output path, checked before any work is done (folder, existing file, suffix,
    and for Parquet that pyarrow is installed)."""
    path = check_output_path(path, force)
    kind = RESULT_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise OutputPathError(f"{path}: unknown results format {path.suffix!r}; use "
                              f"{', '.join(sorted(RESULT_FORMATS))}")
    if kind == "parquet":
        _optional("pyarrow.parquet", "parquet", "writing Parquet")
    return kind


def result_rows(sources: Sequence[str], records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per input: its source, then the result record's fields."""
    if len(sources) != len(records):
        raise ValueError(f"{len(sources)} sources for {len(records)} results")
    return [{"source": source, **record} for source, record in zip(sources, records)]


def write_results(path: str | os.PathLike, rows: Sequence[dict[str, Any]], force: bool = False) -> Path:
    """Write `rows` (from result_rows) to `path` atomically, as JSONL or Parquet by its suffix."""
    kind = results_format(path, force)
    if kind == "jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")), force)
    pyarrow = _optional("pyarrow", "parquet", "writing Parquet")
    parquet = _optional("pyarrow.parquet", "parquet", "writing Parquet")
    table = pyarrow.Table.from_pylist(list(rows))
    return atomic_write(path, lambda handle: parquet.write_table(table, handle), force)
