"""Items to classify from a JSONL or Parquet file: the dataset field names the builder reads (savpack.data) and the
runtime's reader for `savpack-run classify --data` (both engines: the Ray engine parses each record with
`item_from_record` too). One object per line (JSONL) or one row (Parquet): `text` (or `question`), `image` (a path)
or `images` (a list of paths, relative to the file); other fields (such as `label`) are ignored here.

Sources name where each item came from: "file:line" (1-based) for JSONL, "file[row]" (0-based, as the builder names
the entries of a JSON list) for Parquet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError

TEXT_FIELDS = ("text", "question")
IMAGE_FIELDS = ("images", "image")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_BATCH_ROWS = 4096  # rows decoded at a time: memory stays bounded by the batch, not the file


def item_from_record(record: Any, source: str, folder: Path | None) -> dict[str, Any]:
    """{"text", "images"} from one record. Image paths are resolved against `folder` (the data file's folder) and
    checked to exist; folder None (a remote data file) takes only absolute image paths."""
    if not isinstance(record, dict):
        raise InputError(f"{source}: expected an object with text/question and image/images")
    if any(record.get(name) for name in ("video", "videos")):
        raise InputError(f"{source}: videos are a builder feature (savpack classify); the runtime classifies text and images")
    text_field = next((name for name in TEXT_FIELDS if record.get(name) not in (None, "")), None)
    text = record[text_field] if text_field else ""
    if not isinstance(text, str):
        raise InputError(f"{source}: field {text_field!r} must be a string")
    image_field = next((name for name in IMAGE_FIELDS if record.get(name) not in (None, "", [])), None)
    images = record[image_field] if image_field else []
    images = [images] if isinstance(images, str) else images
    if not (isinstance(images, list) and all(isinstance(image, str) and image for image in images)):
        raise InputError(f"{source}: field {image_field!r} must be a path or a list of paths")
    if folder is None and any(not Path(image).is_absolute() for image in images):
        raise InputError(f"{source}: field {image_field!r}: image paths relative to a remote data file cannot be "
                         "resolved; give absolute paths that every worker can read")
    resolved = [image if Path(image).is_absolute() else str(folder / image) for image in images]
    missing = next((image for image in resolved if not Path(image).is_file()), None)
    if missing:
        raise InputError(f"{source}: field {image_field!r}: image file {missing} does not exist")
    return {"text": text.strip(), "images": resolved}


def jsonl_items(lines: list[str], path: str, folder: Path | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(source, item) per non-empty line of a JSONL file's text."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{source}: line is not valid JSON ({exc.msg} at column {exc.colno})") from None
        yield source, item_from_record(record, source, folder)


def parquet_items(handle: Any, path: str, folder: Path | None) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Lists of (source, item), one per batch of rows of a Parquet file (a path or an open file)."""
    parquet = require_pyarrow_parquet()
    try:
        reader = parquet.ParquetFile(handle)
        columns = [name for name in reader.schema_arrow.names if name in TEXT_FIELDS + IMAGE_FIELDS + ("video", "videos")]
        if not any(name in TEXT_FIELDS + IMAGE_FIELDS for name in columns):
            raise InputError(f"{path}: has no column {' or '.join(TEXT_FIELDS + IMAGE_FIELDS)} "
                             f"(columns: {reader.schema_arrow.names[:20]})")
        row = 0
        for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            records = batch.to_pylist()
            yield [(f"{path}[{row + offset}]", item_from_record(record, f"{path}[{row + offset}]", folder))
                   for offset, record in enumerate(records)]
            row += len(records)
    except InputError:
        raise
    except Exception as exc:  # pyarrow's errors (ArrowInvalid, OSError...) on a broken or foreign file
        raise InputError(f"{path}: cannot read as Parquet: {exc}") from None


def read_items(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(source, {"text", "images"}) per item of a JSONL file (any suffix but .parquet) or a Parquet file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; expected a JSONL or Parquet file")
    if not path.exists():
        raise InputError(f"{path}: file does not exist")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        items = [item for batch in parquet_items(str(path), str(path), path.parent) for item in batch]
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read as UTF-8 text: {exc}") from None
        items = list(jsonl_items(lines, str(path), path.parent))
    if not items:
        raise InputError(f"{path}: holds no items")
    return items


def require_pyarrow_parquet():
    """pyarrow.parquet, or a one-line error naming the extra that installs it."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise InputError("Parquet needs pyarrow: pip install 'savpack-runtime[parquet]'") from None
    return parquet
