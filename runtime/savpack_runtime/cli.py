"""savpack-run: classify with a bundle from the command line (numpy + onnxruntime, no torch).

    savpack-run classify BUNDLE --data items.jsonl [--json] [--providers cuda] [--batch-size 8]
    savpack-run info BUNDLE [--json]

Items are read by the builder's reader (savpack_runtime.items): JSONL, a JSON list, CSV/TSV or a folder
root/<label>/<file>, with `text` (or `question`) and `image` / `images` (paths relative to the file); a `label` is
optional. argparse, not click: the runtime keeps its dependencies minimal.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Sequence

from .errors import SavpackError, SavpackWarning
from .items import read_items

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
        "packs": [{"name": entry.name, "labels": list(entry.pack.labels), "k": entry.pack.k, "outputs": entry.outputs}
                  for entry in bundle.packs],
    }
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    print(f"model   {bundle.model['id']}  [{bundle.model['family']}, grid {bundle.model['grid']}]")
    print(f"graph   {graph['kind']}, {summary['heads']} heads up to layer {summary['deepest_layer']}, opset {graph['opset']}, "
          f"{graph['weights']} weights" + (", selected heads only" if graph["selected_heads_only"] else ""))
    print(f"prompt  {bundle.prompt['template']!r} with {bundle.prompt['image_count']} image(s)")
    for entry in summary["packs"]:
        voted = f", votes in the graph ({entry['outputs']['votes']})" if entry["outputs"] else ", votes in numpy (format 1)"
        print(f"pack    {entry['name']}: k = {entry['k']}, labels {', '.join(entry['labels'])}{voted}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="savpack-run", description="Classify with a savpack bundle (no torch).")
    commands = parser.add_subparsers(dest="command", required=True)
    classify = commands.add_parser("classify", help="classify the items of a data file or folder")
    classify.add_argument("bundle", metavar="BUNDLE", help="bundle folder written by `savpack export`")
    classify.add_argument("--data", required=True, help="items: .jsonl, .json, .csv/.tsv or a folder root/<label>/<file>; text/question and image/images")
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
