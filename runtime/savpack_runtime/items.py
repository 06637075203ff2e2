"""Items to classify from a JSONL file: the dataset field names the builder reads (savpack.data) and the runtime's
reader for `savpack-run classify --data`. One JSON object per line: `text` (or `question`), `image` (a path) or
`images` (a list of paths, relative to the file); other fields (such as `label`) are ignored here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError

TEXT_FIELDS = ("text", "question")
IMAGE_FIELDS = ("images", "image")


def read_items(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(source "file:line", {"text", "images"}) per non-empty line of a JSONL file; image paths resolved and checked."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read as UTF-8 text: {exc}") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{source}: line is not valid JSON ({exc.msg} at column {exc.colno})") from None
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
        resolved = [image if Path(image).is_absolute() else str(path.parent / image) for image in images]
        missing = next((image for image in resolved if not Path(image).is_file()), None)
        if missing:
            raise InputError(f"{source}: field {image_field!r}: image file {missing} does not exist")
        items.append((source, {"text": text.strip(), "images": resolved}))
    if not items:
        raise InputError(f"{path}: holds no items")
    return items
