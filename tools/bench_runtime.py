"""Measure what the torch-free runtime costs against the builder, side by side in one run: bundle sizes, import time,
load time, and classifying the case's items end to end (preprocessing, forward, vote): `Classifier.classify_batch`
(runtime) against `savpack.pipeline.classify` with the model (builder, which also stops after the deepest layer).

    python tools/bench_runtime.py --out runtime.json [--repeats 3] [--bundle DIR ...]

Each measurement runs in a fresh interpreter (imports are only cold once), single-threaded, `--repeats` times; the
table shows medians and the JSON (--out) every run. Cases: the golden bundles in exported/
(tiny random-weight models, so compute is small and import and load dominate); --bundle adds your own bundles
(sizes, import and load only). Runtime load = Classifier.load: bundle checks, onnxruntime session, preprocessing. The machine is shared: compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from make_exported import CASES
from measure import write_results

ROOT = Path(__file__).resolve().parent.parent
EXPORTED = ROOT / "exported" / "bundles"

_RUNTIME = """
import json, sys, time
started = time.perf_counter()
from savpack_runtime import Classifier
import onnxruntime
imported = time.perf_counter()
classifier = Classifier.load({bundle!r}, threads=1)
loaded = time.perf_counter()
timing = {{"import_s": imported - started, "load_s": loaded - imported, **{{f"load_{{k}}_s": v for k, v in classifier.load_seconds.items()}}}}
items = {items!r}
if items:
    from savpack_runtime.items import read_items
    from pathlib import Path
    batch = [item for _, item in read_items(Path(items))]
    runs = []
    for _ in range(6):
        begin = time.perf_counter()
        classifier.classify_batch(batch)
        runs.append(time.perf_counter() - begin)
    timing["first_batch_s"], timing["batch_s"] = runs[0], sorted(runs[1:])[2]
banned = [name for name in sys.modules if name.split(".")[0] in ("torch", "transformers", "onnx")]
print(json.dumps({{**timing, "banned_imports": banned}}))
"""

_BUILDER = """
import json, sys, time
started = time.perf_counter()
import torch
torch.set_num_threads(1)
import transformers
from savpack.models import load_model
from savpack.data import load_examples
from savpack.pipeline import classify
from savpack_runtime import Pack
imported = time.perf_counter()
loaded = load_model({model!r}, device="cpu", dtype="float32")
pack = Pack.load({pack!r})
opened = time.perf_counter()
examples = load_examples({items!r}, require_labels=False)
runs = []
for _ in range(6):
    begin = time.perf_counter()
    classify(loaded, pack, examples, batch_size=8, progress=False)
    runs.append(time.perf_counter() - begin)
print(json.dumps({{"import_s": imported - started, "load_s": opened - imported, "first_batch_s": runs[0], "batch_s": sorted(runs[1:])[2]}}))
"""


def _run(script: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    if done.returncode != 0:
        raise SystemExit(f"measurement failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def sizes(bundle: Path) -> dict[str, int]:
    return {str(path.relative_to(bundle)): path.stat().st_size for path in sorted(bundle.rglob("*")) if path.is_file()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results to write")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bundle", action="append", default=[], help="also measure this bundle folder")
    parser.add_argument("--no-builder", action="store_true", help="skip the builder side (no torch needed)")
    return parser.parse_args()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Each golden bundle (and --bundle): the runtime's import, load and batch in fresh interpreters, and the builder
    on the same model and items for comparison."""
    from savpack.testing import build_fixture  # the golden cases' models, rebuilt from their seed

    results: dict[str, Any] = {"repeats": args.repeats, "python": sys.version.split()[0], "cases": {}}
    with tempfile.TemporaryDirectory(prefix="savpack-bench-") as tmp:
        targets = [(name, EXPORTED / name / "bundle", EXPORTED / name) for name in CASES]
        targets += [(Path(path).name, Path(path), None) for path in args.bundle]
        for name, bundle, case in targets:
            items = str(case / "items.jsonl") if case else None
            runtime = [_run(_RUNTIME.format(bundle=str(bundle), items=items)) for _ in range(args.repeats)]
            entry = {"bytes": sizes(bundle), "runtime_runs": runtime}
            if case is not None and not args.no_builder:
                model = build_fixture(CASES[name]["fixture"], Path(tmp) / name, seed=0)
                pack = sorted((bundle / "packs").iterdir())[0]
                entry["builder_runs"] = [_run(_BUILDER.format(model=str(model), pack=str(pack), items=items))
                                         for _ in range(args.repeats)]
            entry["summary"] = summary(entry)
            results["cases"][name] = entry
    return results


def summary(entry: dict[str, Any]) -> dict[str, Any]:
    """Medians over the repeats, sizes in MB."""
    runtime, builder = entry["runtime_runs"], entry.get("builder_runs")
    graph_bytes = sum(size for file, size in entry["bytes"].items() if file.startswith("graph.onnx"))
    values = {"bundle_mb": sum(entry["bytes"].values()) / 1e6, "graph_mb": graph_bytes / 1e6,
              "import_s": _median(runtime, "import_s"), "load_s": _median(runtime, "load_s"),
              "batch_ms": 1000 * _median(runtime, "batch_s") if "batch_s" in runtime[0] else None,
              "banned_imports": sorted({name for run in runtime for name in run["banned_imports"]})}
    if builder:
        values.update(torch_import_s=_median(builder, "import_s"), torch_load_s=_median(builder, "load_s"),
                      torch_batch_ms=1000 * _median(builder, "batch_s"))
    return values


def print_table(results: dict[str, Any]) -> None:
    columns = [("bundle_mb", "bundle MB", 9, ".2f"), ("graph_mb", "graph+data MB", 13, ".2f"), ("import_s", "import s", 9, ".2f"),
               ("torch_import_s", "torch import s", 14, ".2f"), ("load_s", "load s", 7, ".3f"),
               ("torch_load_s", "torch load s", 12, ".3f"), ("batch_ms", "batch ms", 9, ".1f"),
               ("torch_batch_ms", "torch batch ms", 14, ".1f")]
    print(f"{'case':<16} " + " ".join(f"{title:>{width}}" for _, title, width, _ in columns))
    for name, entry in results["cases"].items():
        values = entry["summary"]
        cells = [f"{values[key]:>{width}{scale}}" if values.get(key) is not None else f"{'-':>{width}}"
                 for key, _, width, scale in columns]
        print(f"{name:<16} " + " ".join(cells))


def main() -> None:
    args = parse_args()
    results = measure(args)
    print_table(results)
    write_results(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
