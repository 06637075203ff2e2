"""The one reader of items to classify or learn from, shared by the builder (savpack build, eval, classify) and the
runtime (savpack-run classify).

Formats: JSONL (one object per line), a JSON list of objects, CSV/TSV with a header row, Parquet (extra `parquet`),
a Hugging Face dataset (extra `datasets`: a folder written by `save_to_disk`, or `hf:NAME[:CONFIG][:SPLIT]` from the
hub where the network allows), or a folder `root/<label>/<file>` (an image, a video or a .txt file per example).
Sources name each example: "file:line" (JSONL, CSV), "file[index]" (JSON list, Parquet row, dataset row, 0-based).
Field names follow the official SAVs data: `text` or `question`, `image` or `images` (paths relative to the data
file; in Parquet and datasets also encoded image bytes, or `{"bytes", "path"}` as the `datasets` Image feature stores
them), `video` or `videos`, `label` (a string; a `datasets` ClassLabel gives its names). `Fields` maps other column
names (`--text-field`, `--image-field`, `--label-field`), the way SetFit's column_mapping does.
Several images and videos may be interleaved with the text: an `<image>` marker in the text stands for the next image,
a `<video>` marker for the next video; without markers the videos, then the images, come before the text. Every
problem raises DataError naming the file, line and field.

Videos and interleaved items are builder features (the builder samples frames and renders markers through the chat
template); the runtime's prompt rule puts images first, so it reads with `videos=False` and refuses markers.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import os
import re
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DataError, MissingExtraError, SavpackWarning
from .files import check_file, file_sha256, is_valid_unicode, read_file
from .images import IMAGE_SUFFIXES, ImageBytes

TEXT_FIELDS = ("text", "question")
IMAGE_FIELDS = ("images", "image")
VIDEO_FIELDS = ("videos", "video")
LABEL_FIELD = "label"
TEXT_SUFFIXES = (".txt",)
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_BATCH_ROWS = 4096  # rows decoded at a time: memory follows the batch, not the file
HUB_PREFIX = "hf:"
# Files a `datasets` save_to_disk folder holds (a Dataset), or its DatasetDict parent.
SAVED_DATASET_FILES = ("state.json", "dataset_info.json")
SAVED_DATASET_DICT_FILE = "dataset_dict.json"
# Bounds on what is read at once: a JSONL line, a JSON list file, a folder's .txt example. A reader without them
# would take a 10 GB line (or /dev/zero behind a .jsonl name) into memory whole.
MAX_LINE_CHARS = 16 * 1024 * 1024
MAX_JSON_BYTES = 256 * 1024 * 1024
MAX_TEXT_FILE_BYTES = 16 * 1024 * 1024
# Spreadsheet tools start CSV and JSONL files with a UTF-8 byte-order mark; it is not part of the first field's name.
ENCODING = "utf-8-sig"
IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
_MARKER_PATTERN = re.compile(f"{re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)}")


@dataclass(frozen=True)
class Fields:
    """Which column holds the text, the images and the label; None keeps the default names (text/question,
    image/images, label). Given, a name is the only one read, and a name no item has is an error."""

    text: str | None = None
    image: str | None = None
    label: str | None = None

    OPTIONS = {"text": "--text-field", "image": "--image-field", "label": "--label-field"}

    def names(self, role: str) -> tuple[str, ...]:
        chosen = getattr(self, role)
        return (chosen,) if chosen else {"text": TEXT_FIELDS, "image": IMAGE_FIELDS, "label": (LABEL_FIELD,)}[role]

    def mapped(self) -> dict[str, str]:
        """{role: column} for the roles given."""
        return {role: getattr(self, role) for role in self.OPTIONS if getattr(self, role)}


DEFAULT_FIELDS = Fields()


@dataclass(frozen=True)
class Example:
    """One item of a data file: its text, media (files, absolute or relative to the working folder, or in-memory
    ImageBytes from a Parquet or datasets column) and label."""

    text: str
    images: tuple[str | ImageBytes, ...] = ()
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


def _readable_sha256(path: str | ImageBytes) -> str:
    """sha256 of a file's bytes, or of in-memory image bytes (the same image gives the same digest either way)."""
    if isinstance(path, ImageBytes):
        return hashlib.sha256(path.data).hexdigest()
    try:
        return file_sha256(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc.strerror or exc}") from None


def load_examples(path: str | Path, require_labels: bool = True, videos: bool = True,
                  fields: Fields = DEFAULT_FIELDS) -> list[Example]:
    """Read a data file, folder or dataset. Texts are stripped; media paths are resolved and checked to exist.

    require_labels: every example needs a `label` (building, evaluating); else labels are optional but still checked.
    videos: accept video items (the builder); False refuses them by name (the runtime has no video decoder).
    fields: other column names for the text, images and label.
    """
    if isinstance(path, str) and path.startswith(HUB_PREFIX):
        examples = _read_records(Path("."), _hub_records(path, fields), videos, fields, path, require_labels)
    else:
        examples = _read_path(Path(path), videos, fields, require_labels)
    if not examples:
        raise DataError(f"{path}: dataset holds no examples")
    if require_labels:
        missing = next((example for example in examples if example.label is None), None)
        if missing is not None:
            raise DataError(f"{missing.source}: field {LABEL_FIELD!r} is missing")
    _warn_about_labels(path, examples)
    return examples


def _read_path(path: Path, videos: bool, fields: Fields, require_labels: bool) -> list[Example]:
    suffix = path.suffix.lower()
    if path.is_dir() and _is_saved_dataset(path):
        return _read_records(path, _saved_dataset_records(path, fields), videos, fields, path, require_labels)
    if path.is_dir():
        if fields.mapped():
            raise DataError(f"{path}: a folder root/<label>/<file> has no columns to map; "
                            f"{', '.join(Fields.OPTIONS[role] for role in fields.mapped())} apply to files and datasets")
        return _read_folder(path, videos)
    check_file(path, DataError, "dataset")  # a FIFO, a device or a link loop: refused before anything opens it
    if suffix in JSONL_SUFFIXES:
        return _read_records(path.parent, _jsonl_records(path), videos, fields, path, require_labels)
    if suffix == ".json":
        return _read_records(path.parent, _json_records(path), videos, fields, path, require_labels)
    if suffix in (".csv", ".tsv"):
        return _read_records(path.parent, _csv_records(path), videos, fields, path, require_labels)
    if suffix in PARQUET_SUFFIXES:
        return _read_records(path.parent, parquet_records(str(path), path, fields), videos, fields, path, require_labels)
    raise DataError(f"{path}: unknown dataset format {path.suffix!r}; use .jsonl, .json, .csv, .tsv, .parquet, a saved "
                    "Hugging Face dataset folder, hf:NAME[:CONFIG][:SPLIT] or a folder root/<label>/<file>")


def _optional(module: str, extra: str, purpose: str):
    """Import an optional dependency, or say in one line which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise MissingExtraError(f"{purpose} needs {package}: pip install 'savpack-runtime[{extra}]' "
                                f"(or 'savpack[{extra}]' with the builder)") from None


# -- columnar data: Parquet and Hugging Face datasets ----------------------------------------------------------------


def parquet_records(handle: Any, name: object, fields: Fields = DEFAULT_FIELDS) -> Iterator[tuple[str, Any]]:
    """("name[row]", record) per row of a Parquet file (a path or a random-access file), a batch of rows at a time;
    only the columns an item is made of are decoded. A ClassLabel label column (as `datasets` writes it) gives names."""
    parquet = require_pyarrow_parquet()
    try:
        reader = parquet.ParquetFile(handle)
        schema = reader.schema_arrow
        columns = _wanted_columns(name, schema.names, fields)
        names = _class_names(_parquet_features(schema.metadata), fields, schema.names)
        row = 0
        for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            for record in batch.to_pylist():
                yield _with_class_name(f"{name}[{row}]", record, names)
                row += 1
    except DataError:
        raise
    except Exception as exc:  # pyarrow's errors (ArrowInvalid, OSError, ...) on a broken or foreign file
        raise DataError(f"{name}: cannot read as Parquet: {exc}") from None


def require_pyarrow_parquet():
    """pyarrow.parquet, or a one-line error naming the extra that installs it."""
    return _optional("pyarrow.parquet", "parquet", "Parquet")


def _parquet_features(metadata: dict[bytes, bytes] | None) -> dict[str, Any]:
    """The `datasets` features a Parquet file's metadata carries (its ClassLabel names among them), else {}."""
    try:
        return json.loads((metadata or {})[b"huggingface"])["info"]["features"] or {}
    except (KeyError, TypeError, ValueError):
        return {}


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / SAVED_DATASET_DICT_FILE).is_file() or all((folder / name).is_file() for name in SAVED_DATASET_FILES)


def _saved_dataset_records(folder: Path, fields: Fields) -> Iterator[tuple[str, Any]]:
    if (folder / SAVED_DATASET_DICT_FILE).is_file():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir() and _is_saved_dataset(p))
        raise DataError(f"{folder}: a saved DatasetDict with splits {', '.join(splits) or '(none)'}; give one split's "
                        f"folder, e.g. {folder / (splits[0] if splits else 'train')}")
    datasets = _optional("datasets", "datasets", "reading a saved Hugging Face dataset")
    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets raises many types for a damaged folder; name the folder, keep its reason
        raise DataError(f"{folder}: cannot load as a saved Hugging Face dataset: {_first_line(exc)}") from None
    yield from _dataset_records(str(folder), dataset, fields)


def _hub_records(reference: str, fields: Fields) -> Iterator[tuple[str, Any]]:
    """hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT through datasets.load_dataset (needs the network)."""
    parts = reference[len(HUB_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise DataError(f"{reference}: expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = parts[0], parts[1] if len(parts) == 3 else None, parts[-1] if len(parts) > 1 else None
    datasets = _optional("datasets", "datasets", "reading a Hugging Face hub dataset")
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name, unknown split: one line naming the reference
        raise DataError(f"{reference}: cannot load from the Hugging Face Hub (no network, or an unknown name, config "
                        f"or split?): {_first_line(exc)}") from None
    if isinstance(dataset, dict):  # a DatasetDict: every split
        raise DataError(f"{reference}: holds splits {', '.join(sorted(dataset))}; choose one: {reference}:{sorted(dataset)[0]}")
    yield from _dataset_records(reference, dataset, fields)


def _dataset_records(where: str, dataset: Any, fields: Fields) -> Iterator[tuple[str, Any]]:
    columns = _wanted_columns(where, dataset.column_names, fields)
    # The arrow table as the dataset shows it (selections and shuffles applied); images stay undecoded bytes.
    table = dataset.select_columns(columns).with_format("arrow")[:]
    yield from _table_records(where, table, dataset.features.to_dict(), fields)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _wanted_columns(where: object, names: list[str], fields: Fields) -> list[str]:
    """The columns an item is made of, checked: a mapped column must exist, and some text or image column must."""
    for role, column in fields.mapped().items():
        if column not in names:
            raise DataError(f"{where}: no column {column!r} ({Fields.OPTIONS[role]}); its columns: {', '.join(names)}")
    roles = [*fields.names("text"), *fields.names("image"), *VIDEO_FIELDS, *fields.names("label")]
    wanted = [name for name in names if name in roles]
    if not any(name in wanted for name in (*fields.names("text"), *fields.names("image"), *VIDEO_FIELDS)):
        raise DataError(f"{where}: no text or image column (looked for {', '.join((*fields.names('text'), *fields.names('image')))}); "
                        f"its columns: {', '.join(names)}; choose one with --text-field or --image-field")
    return wanted


def _table_records(where: str, table: Any, features: dict[str, Any], fields: Fields) -> Iterator[tuple[str, Any]]:
    """(source, record) per row of an arrow table."""
    names = _class_names(features, fields, table.column_names)
    for index, record in enumerate(table.to_pylist()):
        yield _with_class_name(f"{where}[{index}]", record, names)


def _class_names(features: dict[str, Any], fields: Fields, columns: list[str]) -> tuple[str, list[str]] | None:
    """(label column, its class names) when the label column is a `datasets` ClassLabel, else None."""
    column = next((name for name in fields.names("label") if name in columns), None)
    feature = features.get(column) if column else None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
        return column, feature["names"]
    return None


def _with_class_name(source: str, record: dict[str, Any], names: tuple[str, list[str]] | None) -> tuple[str, Any]:
    """The record with a ClassLabel id replaced by its name (-1, the `datasets` mark of "no label": none)."""
    if names is not None:
        column, classes = names
        value = record.get(column)
        if isinstance(value, int) and not isinstance(value, bool):
            if value == -1:
                record[column] = None
            elif 0 <= value < len(classes):
                record[column] = classes[value]
            else:
                raise DataError(f"{source}: field {column!r}: class id {value} is outside the ClassLabel's {len(classes)} names")
    return source, record


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as handle:
        yield from jsonl_records(_bounded_lines(handle, path), path)


def _bounded_lines(handle: Any, name: object) -> Iterator[str]:
    """The lines of a text file, each read with a bound (iterating a file reads a line whole, however long)."""
    number = 0
    while line := handle.readline(MAX_LINE_CHARS + 1):
        number += 1
        if len(line) > MAX_LINE_CHARS:
            raise DataError(f"{name}:{number}: line is longer than {MAX_LINE_CHARS} characters (not JSONL, or a "
                            "runaway field)")
        yield line


def jsonl_records(lines: Iterable[str], name: object) -> Iterator[tuple[str, Any]]:
    """("name:line", record) per non-empty line of JSONL text (a file named `name`)."""
    for number, line in enumerate(lines, 1):
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark the reader did not strip (a remote file)
        if not line.strip():
            continue
        yield f"{name}:{number}", _parse_json(line, f"{name}:{number}: line")


def _parse_json(text: str, what: str) -> Any:
    """json.loads, refusing what it would silently accept: a key given twice (the last would win)."""
    try:
        return json.loads(text, object_pairs_hook=lambda pairs: _one_value_per_key(pairs, what))
    except json.JSONDecodeError as exc:
        where = f"at column {exc.colno}" if what.endswith("line") else f"at line {exc.lineno}"
        raise DataError(f"{what} is not valid JSON ({exc.msg} {where})") from None
    except RecursionError:
        raise DataError(f"{what} nests too deeply to be a data record") from None


def _one_value_per_key(pairs: list[tuple[str, Any]], what: str) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = next(key for key in keys if keys.count(key) > 1)
        raise DataError(f"{what} gives the key {twice!r} twice; which value is meant is unclear")
    return dict(pairs)


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    text = read_file(path, MAX_JSON_BYTES, DataError, "JSON dataset").decode(ENCODING)
    records = _parse_json(text, f"{path}: file")
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
        return open(path, encoding=ENCODING, newline="" if path.suffix.lower() in (".csv", ".tsv") else None)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _read_records(base: Path, records: Iterator[tuple[str, Any]], videos: bool, fields: Fields,
                  where: object, require_labels: bool = False) -> list[Example]:
    """Examples from (source, record) pairs; media paths relative to `base`; `where` names the data in messages."""
    try:
        records = list(records)
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if fields.mapped():  # a misspelt column is named as such, not as the first item's missing text
        seen = {key for _, record in records if isinstance(record, dict) for key in record}
        for role, column in fields.mapped().items():
            if records and column not in seen:
                raise DataError(f"{where}: no item has field {column!r} ({Fields.OPTIONS[role]}); "
                                f"its fields: {', '.join(sorted(seen))}")
    return [_example_from_record(base, source, record, videos, fields, require_labels) for source, record in records]


def _example_from_record(base: Path | None, source: str, record: object, videos_allowed: bool,
                         fields: Fields = DEFAULT_FIELDS, require_labels: bool = False) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected an object with fields text/question, image/images, label; got {type(record).__name__}")
    for names in (fields.names("text"), fields.names("image"), VIDEO_FIELDS):
        given = [name for name in names if record.get(name) not in (None, "", [])]
        if len(given) > 1:
            raise DataError(f"{source}: gives both {given[0]!r} and {given[1]!r}; use one (a list of paths for several)")
    text_field = next((name for name in fields.names("text") if record.get(name) not in (None, "")), None)
    text = record[text_field] if text_field else ""
    if not isinstance(text, str):
        raise DataError(f"{source}: field {text_field!r} must be a string, got {type(text).__name__}")
    if not is_valid_unicode(text):
        raise DataError(f"{source}: field {text_field!r} holds invalid Unicode (a lone surrogate escape such as \\udc80)")
    if not videos_allowed and any(record.get(name) not in (None, "", []) for name in VIDEO_FIELDS):
        _refuse_video(source)
    images = _paths(base, source, record, fields.names("image"), "image")
    videos = _paths(base, source, record, VIDEO_FIELDS, "video")
    label_field = fields.names("label")[0]
    label = record.get(label_field)
    if label is None and require_labels:
        state = "is null" if label_field in record else "is missing"
        raise DataError(f"{source}: field {label_field!r} {state}; every example needs its class as a string")
    if label is not None and not isinstance(label, str):
        raise DataError(f"{source}: field {label_field!r} must be a string, got {type(label).__name__} {label!r}"
                        + ("" if fields.label else "; labels are class names (choose a column of names with --label-field)"))
    if label is not None:
        check_label(label, f"{source}: field {label_field!r}")
    text = text.strip()
    if not text and not images and not videos:
        raise DataError(f"{source}: item has no text (field {' or '.join(map(repr, fields.names('text')))} empty or only "
                        "whitespace) and no image or video")
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


def check_label(label: str, where: str) -> str:
    """A label is a class name: a non-empty string on one line, of printable characters (a newline, a tab or another
    control character would break every report, file name and JSON line that shows it)."""
    if not label.strip():
        raise DataError(f"{where} is empty")
    if not is_valid_unicode(label):
        raise DataError(f"{where} holds invalid Unicode (a lone surrogate escape such as \\udc80)")
    bad = next((char for char in label if unicodedata.category(char) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        name = unicodedata.name(bad, "a control character")
        raise DataError(f"{where} {label!r} holds U+{ord(bad):04X} ({name.lower()}); a label is one line of printable "
                        "text")
    return label


def _paths(base: Path | None, source: str, record: dict, fields: tuple[str, ...], kind: str) -> tuple[str | ImageBytes, ...]:
    """The checked, resolved file paths of the first of `fields` the record gives (a path or a list of paths); images
    may also be encoded bytes, or the `datasets` Image feature's {"bytes", "path"} (bytes win when both are given).
    base None: the data file is remote, and only absolute paths can be resolved."""
    field = next((name for name in fields if record.get(name) not in (None, "", [])), None)
    paths = record[field] if field else []
    if not isinstance(paths, list):
        paths = [paths]
    if kind == "image":
        paths = [(path.get("bytes") or path.get("path")) if isinstance(path, dict) else path for path in paths]
    allowed = (str, bytes) if kind == "image" else (str,)
    if not all(isinstance(path, allowed) and path for path in paths):
        what = "a path, encoded image bytes, or a list of them" if kind == "image" else "a path or a list of paths"
        raise DataError(f"{source}: field {field!r} must be {what}")
    resolved: list[str | ImageBytes] = []
    for number, path in enumerate(paths):
        if isinstance(path, bytes):
            resolved.append(ImageBytes(path, f"{source}: field {field!r}" + (f"[{number}]" if len(paths) > 1 else "")))
            continue
        if _URL.match(path):
            raise DataError(f"{source}: field {field!r}: {path!r} is a URL; savpack reads local {kind} files only "
                            "(download it first, and give its path)")
        if base is None and not Path(path).is_absolute():
            raise DataError(f"{source}: field {field!r}: {kind} path {path!r} is relative to a remote data file; give "
                            "absolute paths that every worker can read")
        full = Path(path) if Path(path).is_absolute() else base / path
        if not os.path.lexists(full):
            raise DataError(f"{source}: field {field!r}: {kind} file {full} does not exist")
        try:
            check_file(full, DataError, f"{kind} file")  # a FIFO, a device or a link loop, named here
        except DataError as exc:
            raise DataError(f"{source}: field {field!r}: {exc}") from None
        resolved.append(str(full))
    return tuple(resolved)


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _refuse_video(source: str) -> None:
    raise DataError(f"{source}: videos are a builder feature (savpack classify); the runtime classifies text and images")


def _read_folder(root: Path, videos: bool) -> list[Example]:
    examples = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        check_label(label_dir.name, f"{label_dir}: folder name (the label)")
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
                    text = read_file(file, MAX_TEXT_FILE_BYTES, DataError, "text file").decode(ENCODING).strip()
                except UnicodeDecodeError as exc:
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


def read_items(path: str | Path, fields: Fields = DEFAULT_FIELDS) -> list[tuple[str, dict[str, Any]]]:
    """The runtime's view of a data file: (source, {"text", "images"}) per item; labels optional, no videos, no markers."""
    return [(example.source, runtime_item(example))
            for example in load_examples(path, require_labels=False, videos=False, fields=fields)]


def item_from_record(record: object, source: str, base: Path | None, fields: Fields = DEFAULT_FIELDS) -> dict[str, Any]:
    """The runtime's view of one record (what read_items gives per item), for readers that go record by record (the
    Ray engine's read tasks). base: the data file's folder, None for a remote file."""
    return runtime_item(_example_from_record(base, source, record, videos_allowed=False, fields=fields))


def runtime_item(example: Example) -> dict[str, Any]:
    if example.interleaved:
        raise DataError(f"{example.source}: {IMAGE_MARKER} markers placing images inside the text are a builder "
                        "feature (savpack classify); the runtime's prompt puts the images before the text")
    return {"text": example.text, "images": list(example.images)}
