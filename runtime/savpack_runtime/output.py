"""Classification results as a file: one row per item, written atomically, by both engines of `savpack-run classify`.

Every row is the item's source and the one result record (`Result.to_dict()`), as it is:
- JSONL: `{"source": ..., **record}` per line (what `--json` prints);
- Parquet: the record flattened into columns, nested keys joined by "." as pandas.json_normalize does:
  `source`, `label`, `votes.<class>`, `shares.<class>`, and `packs.<pack>.label`, `packs.<pack>.votes.<class>`...
  when the bundle has several packs. Whatever the record gains (probabilities, abstained) becomes columns too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Sequence

from .errors import OutputPathError
from .files import atomic_write, check_output_path
from .items import JSONL_SUFFIXES, PARQUET_SUFFIXES, require_pyarrow_parquet

SEPARATOR = "."

Row = tuple[str, dict[str, Any]]  # (source, result record)


def flat_row(source: str, record: dict[str, Any]) -> dict[str, Any]:
    """{"source": ..., "label": ..., "votes.<class>": ...}: the Parquet columns of one result record."""
    row: dict[str, Any] = {"source": source}
    _flatten(record, "", row, source)
    return row


def _flatten(value: dict[str, Any], prefix: str, row: dict[str, Any], source: str) -> None:
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            _flatten(item, name + SEPARATOR, row, source)
        elif name in row:
            # Only labels or pack names that contain the separator can collide; refuse rather than drop a value.
            raise OutputPathError(f"{source}: result field {name!r} appears twice once flattened; "
                                  "write JSONL instead (--out *.jsonl)")
        else:
            row[name] = item


def output_kind(path: str | os.PathLike) -> str:
    """"parquet" or "jsonl" from the file name; anything else is refused before any work starts."""
    suffix = Path(path).suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise OutputPathError(f"{path}: unknown output format {suffix or '(no suffix)'!r}; name it *.parquet or *.jsonl")


def check_output(path: str | os.PathLike, force: bool = False, inputs: Sequence[str | os.PathLike | None] = ()) -> str:
    """Refuse early a path that cannot be written, or is one of the `inputs` (and Parquet without pyarrow); returns
    the output kind."""
    kind = output_kind(path)
    check_output_path(path, force, inputs=inputs)
    if kind == "parquet":
        require_pyarrow_parquet()
    return kind


def write_results(path: str | os.PathLike, batches: Iterable[list[Row]], force: bool = False) -> int:
    """Write batches of (source, record) rows as they come; the file appears (atomically) only once all are written.
    Returns the number of rows."""
    kind = check_output(path, force)
    written = 0

    def write(handle: BinaryIO) -> None:
        nonlocal written
        if kind == "jsonl":
            for batch in batches:
                handle.write("".join(json.dumps({"source": source, **record}, ensure_ascii=False) + "\n"
                                     for source, record in batch).encode("utf-8"))
                written += len(batch)
            return
        written = _write_parquet(handle, batches, path)

    atomic_write(path, write, force)
    return written


def _write_parquet(handle: BinaryIO, batches: Iterable[list[Row]], path: str | os.PathLike) -> int:
    import pyarrow as pa

    parquet = require_pyarrow_parquet()
    writer, schema, written = None, None, 0
    try:
        for batch in batches:
            if not batch:
                continue
            rows = [flat_row(source, record) for source, record in batch]
            if writer is None:
                table = pa.Table.from_pylist(rows)
                schema = table.schema
                writer = parquet.ParquetWriter(handle, schema)
            else:
                columns = list(rows[0])
                if columns != schema.names:
                    raise OutputPathError(f"{path}: {rows[0]['source']}: result columns {columns} differ from the "
                                          f"first rows' {schema.names}")
                table = pa.Table.from_pylist(rows, schema=schema)
            writer.write_table(table)
            written += len(rows)
        if writer is None:  # no rows: still a valid (empty) Parquet file
            writer = parquet.ParquetWriter(handle, pa.schema([("source", pa.string())]))
    finally:
        if writer is not None:
            writer.close()
    return written
