"""Labelled datasets: JSONL, JSON, CSV, and folders (`root/<label>/<file>`), with few-shot sampling and a stable hash.

Field names follow the official SAVs data: `question` or `text`, `image` or `images` (paths relative to the file),
`label`; and `video` or `videos` (video files, sampled to frames). Several images (and videos) may be interleaved with
the text: an `<image>` marker in the text stands for the next image, a `<video>` marker for the next video; without
markers the videos, then the images, come before the text. Every problem raises DataError naming the file, line and
field.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from savpack_runtime.errors import SavpackWarning
from savpack_runtime.files import file_sha256
from savpack_runtime.images import IMAGE_SUFFIXES
from savpack_runtime.items import IMAGE_FIELDS, TEXT_FIELDS

from .errors import DataError

VIDEO_FIELDS = ("videos", "video")
TEXT_SUFFIXES = (".txt",)
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
_MARKER_PATTERN = re.compile(f"{re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)}")
DIGEST_CHARS = 16  # of each example's sha256 kept in a pack


@dataclass(frozen=True)
class Example:
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
            hasher.update(_file_sha256(image).encode())
        for video in self.videos:
            hasher.update(b"video:" + _file_sha256(video).encode())
        return hasher.hexdigest()

    @property
    def interleaved(self) -> bool:
        """True when markers in the text place the images and videos (else they all come before the text)."""
        return bool(self.images or self.videos) and (IMAGE_MARKER in self.text or VIDEO_MARKER in self.text)

    def media(self) -> list[tuple[str, str]]:
        """("image" | "video", path) in prompt order: the order of the markers, else the videos, then the images."""
        if not self.interleaved:
            return [("video", path) for path in self.videos] + [("image", path) for path in self.images]
        images, videos = iter(self.images), iter(self.videos)
        return [("image", next(images)) if kind == "image" else ("video", next(videos)) for kind in _markers(self.text)]

    def image_count(self, video_frames: int) -> int:
        """Images the model sees: each video gives `video_frames` frames."""
        return len(self.images) + video_frames * len(self.videos)

    def prompt_text(self, video_frames: int) -> str:
        """The text with each video marker replaced by one image marker per frame (frames go to the model as images)."""
        if not self.interleaved:
            return self.text
        return self.text.replace(VIDEO_MARKER, IMAGE_MARKER * video_frames)


def _markers(text: str) -> list[str]:
    """"image" / "video" for each marker in text, in order."""
    return [marker[1:-1] for marker in _MARKER_PATTERN.findall(text)]


def _file_sha256(path: str) -> str:
    try:
        return file_sha256(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc.strerror or exc}") from None


def load_examples(path: str | Path, require_labels: bool = True) -> list[Example]:
    """Read a dataset file or folder. Texts are stripped; image paths are resolved and checked to exist."""
    path = Path(path)
    if path.is_dir():
        examples = _read_folder(path)
    elif not path.exists():
        raise DataError(f"{path}: dataset does not exist")
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        examples = _read_records(path, _jsonl_records(path))
    elif path.suffix.lower() == ".json":
        examples = _read_records(path, _json_records(path))
    elif path.suffix.lower() in (".csv", ".tsv"):
        examples = _read_records(path, _csv_records(path))
    else:
        raise DataError(f"{path}: unknown dataset format {path.suffix!r}; use .jsonl, .json, .csv, .tsv or a folder root/<label>/<file>")
    if not examples:
        raise DataError(f"{path}: dataset holds no examples")
    if require_labels:
        missing = next((example for example in examples if example.label is None), None)
        if missing is not None:
            raise DataError(f"{missing.source}: field 'label' is missing")
    _warn_about_labels(path, examples)
    return examples


def _jsonl_records(path: Path):
    with _open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: line is not valid JSON ({exc.msg} at column {exc.colno})") from None
            yield f"{path}:{number}", record


def _json_records(path: Path):
    with _open_text(path) as handle:
        try:
            records = json.load(handle)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(records).__name__}")
    for number, record in enumerate(records):
        yield f"{path}[{number}]", record


def _csv_records(path: Path):
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


def _read_records(path: Path, records) -> list[Example]:
    examples = []
    try:
        for source, record in records:
            examples.append(_example_from_record(path.parent, source, record))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return examples


def _example_from_record(base: Path, source: str, record: object) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected an object with fields text/question, image/images, label; got {type(record).__name__}")
    text_field = next((name for name in TEXT_FIELDS if record.get(name) not in (None, "")), None)
    text = record[text_field] if text_field else ""
    if not isinstance(text, str):
        raise DataError(f"{source}: field {text_field!r} must be a string, got {type(text).__name__}")
    images = _paths(base, source, record, IMAGE_FIELDS, "image")
    videos = _paths(base, source, record, VIDEO_FIELDS, "video")
    label = record.get("label")
    if label is not None and not isinstance(label, str):
        raise DataError(f"{source}: field 'label' must be a string, got {type(label).__name__} {label!r}")
    if label is not None and not label.strip():
        raise DataError(f"{source}: field 'label' is empty")
    text = text.strip()
    if not text and not images and not videos:
        raise DataError(f"{source}: item has no text (field 'text' or 'question' empty or only whitespace) and no image or video")
    example = Example(text=text, images=images, label=label, source=source, videos=videos)
    if example.interleaved:
        markers = _markers(text)
        for kind, paths in (("image", images), ("video", videos)):
            if markers.count(kind) != len(paths):
                raise DataError(
                    f"{source}: field {text_field!r} holds {markers.count(kind)} <{kind}> marker(s) but the item gives "
                    f"{len(paths)} {kind}(s); with markers, every image and video needs exactly one"
                )
    return example


def _paths(base: Path, source: str, record: dict, fields: tuple[str, str], kind: str) -> tuple[str, ...]:
    """The checked, resolved file paths of the first of `fields` the record gives (a path or a list of paths)."""
    field = next((name for name in fields if record.get(name) not in (None, "", [])), None)
    paths = record[field] if field else []
    if isinstance(paths, str):
        paths = [paths]
    if not (isinstance(paths, list) and all(isinstance(path, str) and path for path in paths)):
        raise DataError(f"{source}: field {field!r} must be a path or a list of paths")
    resolved = []
    for path in paths:
        full = Path(path) if Path(path).is_absolute() else base / path
        if not full.is_file():
            raise DataError(f"{source}: field {field!r}: {kind} file {full} does not exist")
        resolved.append(str(full))
    return tuple(resolved)


def _read_folder(root: Path) -> list[Example]:
    examples = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(p for p in label_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
            suffix = file.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                examples.append(Example(text="", images=(str(file),), label=label_dir.name, source=str(file)))
            elif suffix in VIDEO_SUFFIXES:
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


def labels_of(examples: list[Example]) -> list[str]:
    """The classes, sorted: class index i is labels[i] everywhere in savpack."""
    return sorted({example.label for example in examples if example.label is not None})


def sample_shots(labels: Sequence[str], shots: int, seed: int) -> tuple[list[int], list[int]]:
    """Draw `shots` indices per class (seeded); returns (sampled, the rest), each in ascending order."""
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    if shots < 1:
        raise DataError(f"--shots must be >= 1, got {shots}")
    rng = random.Random(seed)
    chosen: set[int] = set()
    for label in sorted(by_label):
        indices = by_label[label]
        if shots > len(indices):
            raise DataError(f"--shots {shots} is more than class {label!r} has ({len(indices)} examples)")
        chosen.update(rng.sample(indices, shots))
    return sorted(chosen), [index for index in range(len(labels)) if index not in chosen]


def dataset_summary(digests: Sequence[str], labels: Sequence[str]) -> dict[str, object]:
    """What a pack records of its data: sha256 over the examples' digests in order, the count, per-class counts,
    and a prefix of each example's digest (so evaluation can recognise and skip training examples)."""
    hasher = hashlib.sha256()
    for digest in digests:
        hasher.update(digest.encode())
    return {"sha256": hasher.hexdigest(), "examples": len(digests), "class_counts": dict(sorted(Counter(labels).items())),
            "example_digests": sorted(digest[:DIGEST_CHARS] for digest in digests)}
