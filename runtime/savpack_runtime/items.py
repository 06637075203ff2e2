"""The one reader of items to classify or learn from, shared by the builder (savpack build, eval, classify) and the
runtime (savpack-run classify).

Formats: JSONL (one object per line), a JSON list of objects, CSV/TSV with a header row, Parquet (one row per
example; needs pyarrow, extra `parquet`), or a folder `root/<label>/<file>` (an image, a video or a .txt file per
example). Sources name each example: "file:line" (JSONL, CSV), "file[index]" (JSON list, Parquet row, 0-based). Field names follow the official SAVs data:
`text` or `question`, `image` or `images` (paths relative to the data file), `video` or `videos`, `label` (a string).
Several images and videos may be interleaved with the text: an `<image>` marker in the text stands for the next image,
a `<video>` marker for the next video; without markers the videos, then the images, come before the text. Every
problem raises DataError naming the file, line and field.

Videos and interleaved items are builder features (the builder samples frames and renders markers through the chat
template); the runtime's prompt rule puts images first, so it reads with `videos=False` and refuses markers.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DataError, SavpackWarning
from .files import file_sha256
from .images import IMAGE_SUFFIXES

TEXT_FIELDS = ("text", "question")
IMAGE_FIELDS = ("images", "image")
VIDEO_FIELDS = ("videos", "video")
LABEL_FIELD = "label"
TEXT_SUFFIXES = (".txt",)
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_BATCH_ROWS = 4096  # rows decoded at a time: memory follows the batch, not the file
IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
_MARKER_PATTERN = re.compile(f"{re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)}")


@dataclass(frozen=True)
class Example:
    """One item of a data file: its text, media files (absolute or relative to the working folder) and label."""

    text: str
    images: tuple[str, ...] = ()
    label: str | None = None
    source: str = ""  # "file:line", for messages
    videos: tuple[str, ...] = ()

    def digest(self) -> str:
        """sha256 of what the model sees (text, image and video bytes) and the label: identifies the example anywhere."""
        hasher = hashlib.sha256()
        hasher.update(json.dumps([self.text, self.label], ensure_ascii=False).encode())
        for image in self.images:
            hasher.update(_readable_sha256(image).encode())
        for video in self.videos:
            hasher.update(b"video:" + _readable_sha256(video).encode())
        return hasher.hexdigest()

    @property
    def interleaved(self) -> bool:
        """True when markers in the text place the images and videos (else they all come before the text)."""
        return bool(self.images or self.videos) and has_markers(self.text)

    def media(self) -> list[tuple[str, str]]:
        """("image" | "video", path) in prompt order: the order of the markers, else the videos, then the images."""
        if not self.interleaved:
            return [("video", path) for path in self.videos] + [("image", path) for path in self.images]
        images, videos = iter(self.images), iter(self.videos)
        return [("image", next(images)) if kind == "image" else ("video", next(videos)) for kind in markers(self.text)]

    def image_count(self, video_frames: int) -> int:
        """Images the model sees: each video gives `video_frames` frames."""
        return len(self.images) + video_frames * len(self.videos)

    def prompt_text(self, video_frames: int) -> str:
        """The text with each video marker replaced by one image marker per frame (frames go to the model as images)."""
        if not self.interleaved:
            return self.text
        return self.text.replace(VIDEO_MARKER, IMAGE_MARKER * video_frames)


def has_markers(text: str) -> bool:
    """Whether `text` holds an `<image>` or `<video>` marker."""
    return _MARKER_PATTERN.search(text) is not None


def markers(text: str) -> list[str]:
    """"image" / "video" for each marker in text, in order."""
    return [marker[1:-1] for marker in _MARKER_PATTERN.findall(text)]


def _readable_sha256(path: str) -> str:
    try:
        return file_sha256(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc.strerror or exc}") from None


def load_examples(path: str | Path, require_labels: bool = True, videos: bool = True) -> list[Example]:
    """Read a data file or folder. Texts are stripped; media paths are resolved and checked to exist.

    require_labels: every example needs a `label` (building, evaluating); else labels are optional but still checked.
    videos: accept video items (the builder); False refuses them by name (the runtime has no video decoder).
    """
    path = Path(path)
    if path.is_dir():
        examples = _read_folder(path, videos)
    elif not path.exists():
        raise DataError(f"{path}: dataset does not exist")
    elif path.suffix.lower() in JSONL_SUFFIXES:
        examples = _read_records(path, _jsonl_records(path), videos)
    elif path.suffix.lower() == ".json":
        examples = _read_records(path, _json_records(path), videos)
    elif path.suffix.lower() in (".csv", ".tsv"):
        examples = _read_records(path, _csv_records(path), videos)
    elif path.suffix.lower() in PARQUET_SUFFIXES:
        examples = _read_records(path, parquet_records(str(path), path), videos)
    else:
        raise DataError(f"{path}: unknown dataset format {path.suffix!r}; use .jsonl, .json, .csv, .tsv, .parquet or a "
                        "folder root/<label>/<file>")
    if not examples:
        raise DataError(f"{path}: dataset holds no examples")
    if require_labels:
        missing = next((example for example in examples if example.label is None), None)
        if missing is not None:
            raise DataError(f"{missing.source}: field {LABEL_FIELD!r} is missing")
    _warn_about_labels(path, examples)
    return examples


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as handle:
        yield from jsonl_records(handle, path)


def jsonl_records(lines: Iterable[str], name: object) -> Iterator[tuple[str, Any]]:
    """("name:line", record) per non-empty line of JSONL text (a file named `name`)."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{number}: line is not valid JSON ({exc.msg} at column {exc.colno})") from None
        yield f"{name}:{number}", record


def parquet_records(handle: Any, name: object) -> Iterator[tuple[str, Any]]:
    """("name[row]", record) per row of a Parquet file (a path or a random-access file), a batch of rows at a time."""
    parquet = require_pyarrow_parquet()
    try:
        reader = parquet.ParquetFile(handle)
        wanted = TEXT_FIELDS + IMAGE_FIELDS + VIDEO_FIELDS + (LABEL_FIELD,)
        columns = [column for column in reader.schema_arrow.names if column in wanted]
        if not any(column in TEXT_FIELDS + IMAGE_FIELDS + VIDEO_FIELDS for column in columns):
            raise DataError(f"{name}: has no column {', '.join(TEXT_FIELDS + IMAGE_FIELDS)} "
                            f"(its columns: {reader.schema_arrow.names[:20]})")
        batches = reader.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                yield f"{name}[{row}]", record
                row += 1
    except DataError:
        raise
    except Exception as exc:  # pyarrow's errors (ArrowInvalid, OSError, ...) on a broken or foreign file
        raise DataError(f"{name}: cannot read as Parquet: {exc}") from None


def require_pyarrow_parquet():
    """pyarrow.parquet, or a one-line error naming the extra that installs it."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise DataError("Parquet needs pyarrow: pip install 'savpack-runtime[parquet]'") from None
    return parquet


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as handle:
        try:
            records = json.load(handle)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(records).__name__}")
    for number, record in enumerate(records):
        yield f"{path}[{number}]", record


def _csv_records(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        try:
            for record in reader:
                yield f"{path}:{reader.line_num}", {key: value for key, value in record.items() if key is not None}
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV: {exc}") from None


def _open_text(path: Path):
    try:
        return open(path, encoding="utf-8", newline="" if path.suffix.lower() in (".csv", ".tsv") else None)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _read_records(path: Path, records: Iterator[tuple[str, Any]], videos: bool) -> list[Example]:
    examples = []
    try:
        for source, record in records:
            examples.append(_example_from_record(path.parent, source, record, videos))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return examples


def _example_from_record(base: Path | None, source: str, record: object, videos_allowed: bool) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected an object with fields text/question, image/images, label; got {type(record).__name__}")
    text_field = next((name for name in TEXT_FIELDS if record.get(name) not in (None, "")), None)
    text = record[text_field] if text_field else ""
    if not isinstance(text, str):
        raise DataError(f"{source}: field {text_field!r} must be a string, got {type(text).__name__}")
    if not videos_allowed and any(record.get(name) not in (None, "", []) for name in VIDEO_FIELDS):
        _refuse_video(source)
    images = _paths(base, source, record, IMAGE_FIELDS, "image")
    videos = _paths(base, source, record, VIDEO_FIELDS, "video")
    label = record.get(LABEL_FIELD)
    if label is not None and not isinstance(label, str):
        raise DataError(f"{source}: field {LABEL_FIELD!r} must be a string, got {type(label).__name__} {label!r}")
    if label is not None and not label.strip():
        raise DataError(f"{source}: field {LABEL_FIELD!r} is empty")
    text = text.strip()
    if not text and not images and not videos:
        raise DataError(f"{source}: item has no text (field 'text' or 'question' empty or only whitespace) and no image or video")
    example = Example(text=text, images=images, label=label, source=source, videos=videos)
    if example.interleaved:
        found = markers(text)
        for kind, paths in (("image", images), ("video", videos)):
            if found.count(kind) != len(paths):
                raise DataError(
                    f"{source}: field {text_field!r} holds {found.count(kind)} <{kind}> marker(s) but the item gives "
                    f"{len(paths)} {kind}(s); with markers, every image and video needs exactly one"
                )
    return example


def _paths(base: Path | None, source: str, record: dict, fields: tuple[str, str], kind: str) -> tuple[str, ...]:
    """The checked, resolved file paths of the first of `fields` the record gives (a path or a list of paths).
    base None: the data file is remote, and only absolute paths can be resolved."""
    field = next((name for name in fields if record.get(name) not in (None, "", [])), None)
    paths = record[field] if field else []
    if isinstance(paths, str):
        paths = [paths]
    if not (isinstance(paths, list) and all(isinstance(path, str) and path for path in paths)):
        raise DataError(f"{source}: field {field!r} must be a path or a list of paths")
    resolved = []
    for path in paths:
        if base is None and not Path(path).is_absolute():
            raise DataError(f"{source}: field {field!r}: {kind} path {path!r} is relative to a remote data file; give "
                            "absolute paths that every worker can read")
        full = Path(path) if Path(path).is_absolute() else base / path
        if not full.is_file():
            raise DataError(f"{source}: field {field!r}: {kind} file {full} does not exist")
        resolved.append(str(full))
    return tuple(resolved)


def _refuse_video(source: str) -> None:
    raise DataError(f"{source}: videos are a builder feature (savpack classify); the runtime classifies text and images")


def _read_folder(root: Path, videos: bool) -> list[Example]:
    examples = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(p for p in label_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
            suffix = file.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                examples.append(Example(text="", images=(str(file),), label=label_dir.name, source=str(file)))
            elif suffix in VIDEO_SUFFIXES:
                if not videos:
                    _refuse_video(str(file))
                examples.append(Example(text="", videos=(str(file),), label=label_dir.name, source=str(file)))
            elif suffix in TEXT_SUFFIXES:
                try:
                    text = file.read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as exc:
                    raise DataError(f"{file}: cannot read as UTF-8 text: {exc}") from None
                if not text:
                    raise DataError(f"{file}: text file is empty")
                examples.append(Example(text=text, label=label_dir.name, source=str(file)))
    if not examples:
        raise DataError(f"{root}: folder holds no root/<label>/<image, video or .txt file> examples")
    return examples


def _warn_about_labels(path: Path, examples: list[Example]) -> None:
    labels = sorted({example.label for example in examples if example.label is not None})
    by_folded: dict[str, list[str]] = {}
    for label in labels:
        by_folded.setdefault(" ".join(label.split()).casefold(), []).append(label)
    for variants in by_folded.values():
        if len(variants) > 1:
            warnings.warn(f"{path}: labels {variants} differ only in case or whitespace; they are different classes", SavpackWarning)
    seen = Counter((example.text, example.images, example.videos) for example in examples)
    duplicates = sum(count - 1 for count in seen.values() if count > 1)
    if duplicates:
        warnings.warn(f"{path}: {duplicates} duplicate example(s) (same text and images); each copy counts", SavpackWarning)


def read_items(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """The runtime's view of a data file: (source, {"text", "images"}) per item; labels optional, no videos, no markers."""
    return [(example.source, runtime_item(example)) for example in load_examples(path, require_labels=False, videos=False)]


def item_from_record(record: object, source: str, base: Path | None) -> dict[str, Any]:
    """The runtime's view of one record (what read_items gives per item), for readers that go record by record (the
    Ray engine's read tasks). base: the data file's folder, None for a remote file."""
    return runtime_item(_example_from_record(base, source, record, videos_allowed=False))


def runtime_item(example: Example) -> dict[str, Any]:
    if example.interleaved:
        raise DataError(f"{example.source}: {IMAGE_MARKER} markers placing images inside the text are a builder "
                        "feature (savpack classify); the runtime's prompt puts the images before the text")
    return {"text": example.text, "images": list(example.images)}
