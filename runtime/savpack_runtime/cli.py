"""savpack-run: classify with a bundle from the command line (numpy + onnxruntime, no torch).

    savpack-run classify BUNDLE --data items.jsonl [--json] [--providers cuda] [--batch-size 8]
    savpack-run info BUNDLE [--json]

Items are JSON lines with `text` (or `question`) and `image` / `images` (paths relative to the file), as the
builder reads them; a `label` field is ignored. argparse, not click: the runtime keeps its dependencies minimal.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from .errors import InputError, SavpackError, SavpackWarning

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


def _classify(args: argparse.Namespace) -> None:
    from .classifier import Classifier

    classifier = Classifier.load(args.bundle, providers=args.providers, threads=args.threads, batch_size=args.batch_size)
    items = read_items(Path(args.data))
    results = classifier.classify_batch([item for _, item in items])
    if args.json:
        for (source, _), result in zip(items, results):
            print(json.dumps({"source": source, **result.to_dict()}, ensure_ascii=False))
        return
    width = max(len(source) for source, _ in items)
    for (source, _), result in zip(items, results):
        cells = [f"{name}={value.label} ({value.shares[value.label]:.2f})" for name, value in result.by_pack.items()]
        print(f"{source:<{width}}  " + "  ".join(cells))


def _info(args: argparse.Namespace) -> None:
    from .bundle import Bundle

    bundle = Bundle.load(args.bundle)
    graph = bundle.graph
    summary = {
        "model": bundle.model, "prompt": bundle.prompt["template"], "image_count": bundle.prompt["image_count"],
        "graph": {key: graph[key] for key in ("kind", "inputs", "opset", "weights", "selected_heads_only")},
        "heads": len(bundle.heads), "deepest_layer": int(bundle.heads[:, 0].max()),
        "packs": [{"name": entry.name, "labels": list(entry.pack.labels), "k": entry.pack.k} for entry in bundle.packs],
    }
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    print(f"model   {bundle.model['id']}  [{bundle.model['family']}, grid {bundle.model['grid']}]")
    print(f"graph   {graph['kind']}, {summary['heads']} heads up to layer {summary['deepest_layer']}, opset {graph['opset']}, "
          f"{graph['weights']} weights" + (", selected heads only" if graph["selected_heads_only"] else ""))
    print(f"prompt  {bundle.prompt['template']!r} with {bundle.prompt['image_count']} image(s)")
    for entry in summary["packs"]:
        print(f"pack    {entry['name']}: k = {entry['k']}, labels {', '.join(entry['labels'])}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="savpack-run", description="Classify with a savpack bundle (no torch).")
    commands = parser.add_subparsers(dest="command", required=True)
    classify = commands.add_parser("classify", help="classify the items of a JSONL file")
    classify.add_argument("bundle", metavar="BUNDLE", help="bundle folder written by `savpack export`")
    classify.add_argument("--data", required=True, help="JSONL file: text/question and image/images per line")
    classify.add_argument("--json", action="store_true", help="one JSON object per item: label, votes, shares (per pack)")
    classify.add_argument("--providers", default="cpu", help="cpu or cuda (falls back to cpu with a warning)")
    classify.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    classify.add_argument("--batch-size", type=int, default=8, help="items per forward (default 8)")
    classify.set_defaults(run=_classify)
    info = commands.add_parser("info", help="what a bundle holds")
    info.add_argument("bundle", metavar="BUNDLE")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_info)
    args = parser.parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        parser.error("--batch-size must be >= 1")
    with warnings.catch_warnings():
        warnings.simplefilter("always", SavpackWarning)
        warnings.showwarning = lambda message, *rest, **kwargs: print(f"warning: {message}", file=sys.stderr)
        try:
            args.run(args)
        except SavpackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
