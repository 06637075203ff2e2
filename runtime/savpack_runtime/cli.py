"""savpack-run: classify with a bundle from the command line (numpy + onnxruntime, no torch).

    savpack-run classify BUNDLE --data items.jsonl [--json | --out results.parquet] [--providers cuda] [--batch-size 8]
    savpack-run classify BUNDLE --data items.parquet --out results.parquet --engine ray [--workers 2] [--address auto]
    savpack-run info BUNDLE [--json]
    savpack-run serve BUNDLE [--host 127.0.0.1] [--port 8080] [--max-batch 32] [--max-wait-ms 5] [--max-queue 256]

Items are read by the builder's reader (savpack_runtime.items): JSONL, a JSON list, CSV/TSV, Parquet, a saved Hugging
Face dataset or a folder root/<label>/<file>, with `text` (or `question`) and `image` / `images` (paths relative to
the file, or image bytes in Parquet and datasets); `--text-field`, `--image-field` map other columns; a `label` is
optional. `--engine ray` (extra savpack-runtime[ray], docs/scale.md) reads JSONL and Parquet files, folders of them
and filesystem URLs. argparse, not click: the runtime keeps its dependencies minimal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Sequence

from .errors import MissingExtraError, SavpackError, SavpackWarning
from .classifier import MAX_BATCH_SIZE
from .items import Fields, read_items
from .output import check_output, write_results
from .result import PackResult
from .scoring import check_threshold
from .session import MAX_THREADS

def _classify(args: argparse.Namespace) -> None:
    if args.engine == "ray":
        _classify_on_ray(args)
        return
    from .classifier import Classifier

    if args.out:
        check_output(args.out, args.force, inputs=[args.data, args.bundle])
    classifier = Classifier.load(args.bundle, providers=args.providers, threads=args.threads, batch_size=args.batch_size,
                                 check_weights=args.check_weights)
    items = read_items(args.data, Fields(args.text_field, args.image_field, args.label_field))
    results = classifier.classify_batch([item for _, item in items], abstain_below=args.abstain_below)
    if args.out:
        rows = write_results(args.out, [[(source, result.to_dict()) for (source, _), result in zip(items, results)]], args.force)
        print(f"wrote {args.out}: {rows} rows", file=sys.stderr)
        return
    if args.json:
        for (source, _), result in zip(items, results):
            print(json.dumps({"source": source, **result.to_dict()}, ensure_ascii=False))
        return
    width = max(len(source) for source, _ in items)
    for (source, _), result in zip(items, results):
        cells = [f"{name}={_decision_text(value)}" for name, value in result.by_pack.items()]
        print(f"{source:<{width}}  " + "  ".join(cells))


def _decision_text(result: PackResult) -> str:
    """label (top probability), or "abstained (top label p)" when the label is withheld."""
    top = max(result.probabilities, key=result.probabilities.get)
    if result.abstained:
        return f"abstained ({top} {result.probabilities[top]:.2f})"
    return f"{result.label} ({result.probabilities[result.label]:.2f})"


def _classify_on_ray(args: argparse.Namespace) -> None:
    if not args.out:
        raise SavpackError("--engine ray writes its rows to a file: give --out results.parquet (or .jsonl)")
    try:
        from . import ray_engine
    except ImportError as exc:
        raise SavpackError(f"--engine ray needs Ray Data ({exc.name} is missing): pip install 'savpack-runtime[ray]'") from None
    options = ray_engine.RayOptions(address=args.address, workers=args.workers, batch_size=args.batch_size,
                                    cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                                    providers=args.providers, threads=args.threads, check_weights=args.check_weights,
                                    abstain_below=args.abstain_below)
    summary = ray_engine.classify_to_file(args.bundle, [args.data], args.out, options, force=args.force,
                                          fields=Fields(args.text_field, args.image_field, args.label_field))
    print(f"wrote {args.out}: {summary['rows']} rows in {summary['seconds']:.1f} s "
          f"({summary['rows_per_second']:,.0f} rows/s, {options.workers} workers; first rows after "
          f"{summary['first_rows_seconds']:.1f} s)", file=sys.stderr)


def _serve(args: argparse.Namespace) -> None:
    try:
        from .serve import Limits, ServeOptions, run_server
    except ImportError as exc:
        raise MissingExtraError(f"savpack-run serve needs the serve extra ({exc.name} is missing): "
                                "pip install 'savpack-runtime[serve]'") from None
    from .classifier import Classifier

    limits = Limits(max_body_bytes=args.max_body_bytes, max_inputs=args.max_inputs, max_images=args.max_images,
                    max_image_pixels=args.max_image_pixels)
    options = ServeOptions(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, limits=limits)
    # The forward's threads must leave a core to the event loop that reads, checks and answers requests (measured on 2
    # cores: all cores for onnxruntime halved the throughput at concurrency 32; docs/serving.md).
    threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    classifier = Classifier.load(args.bundle, providers=args.providers, threads=threads, batch_size=args.max_batch)
    run_server(classifier, options, args.host, args.port, log_level=args.log_level, access_log=args.access_log,
               graceful_seconds=args.graceful_seconds)


def _info(args: argparse.Namespace) -> None:
    from .bundle import Bundle

    bundle = Bundle.load(args.bundle, check_weights=args.check_weights)
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
        outputs = entry["outputs"]
        voted = ", votes in numpy (format 1)" if not outputs else f", votes in the graph ({outputs['votes']})" + \
            (f", probabilities too ({outputs['probabilities']})" if "probabilities" in outputs else ", probabilities in numpy")
        print(f"pack    {entry['name']}: k = {entry['k']}, labels {', '.join(entry['labels'])}{voted}")


def _whole_number(low: int, high: int):
    """argparse type: a whole number in [low, high] (a usage error, exit 2, otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value
    return parse


def _probability(text: str) -> float:
    """argparse type: a probability from 0 to 1 (nan, inf and others are a usage error, exit 2)."""
    try:
        return check_threshold(float(text), "--abstain-below")
    except (ValueError, SavpackError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability from 0 to 1") from exc


def _add_weights_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-check-weights", dest="check_weights", action="store_false",
                        help="skip hashing the graph weights against bundle.json (only for a bundle verified once and "
                             "stored where nobody else writes; the other files are still checked)")


def add_field_options(parser: argparse.ArgumentParser) -> None:
    """--text-field, --image-field, --label-field: the columns holding each part of an item (savpack_runtime.items.Fields)."""
    for role, option in Fields.OPTIONS.items():
        parser.add_argument(option, dest=f"{role}_field", default=None, metavar="COLUMN",
                            help=f"column holding the item's {role} (default: {' or '.join(Fields().names(role))})")


def _check_classify_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.json and args.out:
        parser.error("--json prints rows, --out writes them: choose one")
    ray_only = {"--address": args.address, "--workers": args.workers, "--cpus-per-worker": args.cpus_per_worker,
                "--gpus-per-worker": args.gpus_per_worker}
    given = [name for name, value in ray_only.items() if value is not None]
    if args.engine != "ray" and given:
        parser.error(f"{', '.join(given)} go(es) with --engine ray")
    args.workers = 2 if args.workers is None else args.workers
    args.cpus_per_worker = 1.0 if args.cpus_per_worker is None else args.cpus_per_worker
    args.gpus_per_worker = 0.0 if args.gpus_per_worker is None else args.gpus_per_worker
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if not args.cpus_per_worker > 0:
        parser.error("--cpus-per-worker must be > 0")
    if not args.gpus_per_worker >= 0:
        parser.error("--gpus-per-worker must be >= 0")


def _check_serve_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for option in ("max_batch", "max_queue", "max_inputs", "max_image_pixels", "max_body_bytes", "graceful_seconds"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.max_images < 0 or not 0 <= args.max_wait_ms <= 60_000 or not 0 <= args.port <= 65535:
        parser.error("--max-images must be >= 0, --max-wait-ms between 0 and 60000, --port between 0 and 65535")
    if args.max_inputs > args.max_queue:
        parser.error(f"--max-inputs {args.max_inputs} is more than --max-queue {args.max_queue}: such a request could never be admitted")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="savpack-run", description="Classify with a savpack bundle (no torch).")
    commands = parser.add_subparsers(dest="command", required=True)
    classify = commands.add_parser("classify", help="classify the items of a data file or folder")
    classify.add_argument("bundle", metavar="BUNDLE", help="bundle folder written by `savpack export`")
    classify.add_argument("--data", required=True,
                          help="items: .jsonl, .json, .csv/.tsv, .parquet, a saved Hugging Face dataset folder, "
                               "hf:NAME[:CONFIG][:SPLIT] or a folder root/<label>/<file>; text/question and image/images "
                               "(--engine ray: .jsonl or .parquet files, folders of them, or a filesystem URL such as "
                               "s3://bucket/items/, with the default column names)")
    add_field_options(classify)
    classify.add_argument("--json", action="store_true",
                          help="one JSON object per item: label, probabilities, votes, shares (per pack)")
    classify.add_argument("--abstain-below", type=_probability, default=None, metavar="P",
                          help="withhold the label (null, abstained true) where the top probability is below P")
    classify.add_argument("--out", default=None,
                          help="write one row per item to this file: *.parquet (flat columns) or *.jsonl (as --json)")
    classify.add_argument("--force", action="store_true", help="replace --out if it exists")
    classify.add_argument("--providers", default="cpu", help="cpu or cuda (falls back to cpu with a warning)")
    classify.add_argument("--threads", type=_whole_number(1, MAX_THREADS), default=None,
                          help="onnxruntime intra-op threads (default: all cores; --engine ray: --cpus-per-worker)")
    classify.add_argument("--batch-size", type=_whole_number(1, MAX_BATCH_SIZE), default=8,
                          help="items per forward, and per Ray batch (default 8)")
    _add_weights_option(classify)
    engine = classify.add_argument_group("Ray Data engine (savpack-runtime[ray], docs/scale.md)")
    engine.add_argument("--engine", choices=("single", "ray"), default="single",
                        help="single: this process (default); ray: one Classifier per Ray actor")
    engine.add_argument("--address", default=None,
                        help="Ray cluster to join: auto or ray://HOST:PORT (default: start a local Ray)")
    engine.add_argument("--workers", type=int, default=None, help="Ray actors, one Classifier each (default 2)")
    engine.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs Ray reserves per actor (default 1)")
    engine.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs Ray reserves per actor (with --providers cuda)")
    classify.set_defaults(run=_classify)
    serve = commands.add_parser("serve", help="classify over HTTP (needs the serve extra); see docs/serving.md",
                                description="Serve a bundle over HTTP: POST /v1/classify, GET /health, /info, /metrics, "
                                            "/openapi.json, and a playground page at /.")
    serve.add_argument("bundle", metavar="BUNDLE", help="bundle folder written by `savpack export`")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free port, printed at start)")
    serve.add_argument("--max-batch", type=int, default=32, help="items per forward, across requests (default 32; 1: no batching)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (default 5 ms)")
    serve.add_argument("--max-queue", type=int, default=256, help="items admitted and not yet answered; more get 429 (default 256)")
    serve.add_argument("--max-inputs", type=int, default=32, help="items per request; more get 413 (default 32)")
    serve.add_argument("--max-images", type=int, default=8, help="images per item; more get 413 (default 8)")
    serve.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="pixels per image, read from its header "
                       "before decoding; more get 413 (default 16777216 = 4096x4096)")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="request body size; more get 413 (default 8 MiB)")
    serve.add_argument("--providers", default="cpu", help="cpu or cuda (falls back to cpu with a warning)")
    serve.add_argument("--threads", type=int, default=None,
                       help="onnxruntime intra-op threads (default: all cores but one, which the HTTP event loop needs)")
    serve.add_argument("--graceful-seconds", type=int, default=30, help="on SIGTERM, how long requests in flight may finish (default 30)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--no-access-log", dest="access_log", action="store_false", help="no line per request")
    serve.set_defaults(run=_serve)
    info = commands.add_parser("info", help="what a bundle holds")
    info.add_argument("bundle", metavar="BUNDLE")
    info.add_argument("--json", action="store_true")
    _add_weights_option(info)
    info.set_defaults(run=_info)
    args = parser.parse_args(argv)
    if args.command == "classify":
        _check_classify_options(parser, args)
    if args.command == "serve":
        _check_serve_options(parser, args)
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
