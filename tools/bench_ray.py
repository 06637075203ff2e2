"""Measure `savpack-run classify --engine ray` against the single-process command, side by side in one run: N text items
(default 100,000) through a tiny bundle with the single-process command and with 1 and 2 local Ray workers; rows per
second, the 2-worker / 1-worker ratio, peak memory of each worker, CPU time, and item-by-item equality of the outputs.

    python tools/bench_ray.py --out ray.json [--items 100000] [--bundle exported/bundles/qwen2/bundle]
                              [--batch-size 32] [--workers 1,2] [--cache DIR]

Every run is the real command (`savpack-run classify ... --out results.parquet`) in its own process; a sampler walks
that process's tree every 0.2 s and keeps, per process, its CPU seconds and its peak RSS (VmHWM). Workers are the
processes whose command line names the Ray actor (ray::MapWorker(MapBatches(ClassifyActor))).

Figures: `rows/s` = rows / the run's wall time (everything: Ray's start, actors loading the bundle, classification,
writing); `rows/s after first rows` leaves out the start (Ray's own figure: rows after the first batch came back).
The machine is shared: `worker CPU share` is the CPU the workers got over wall time x workers (1.0 = a full core each);
`rows per worker CPU s` shows the cost per row, which does not depend on how busy the machine was. The single-process
runs use 1 onnxruntime thread (as each worker does) and, as users run it by default, all cores.

The items: texts of the SST-2 sets in the shared data folder ($SAVPACK_DATA), cycled to N lines (generated sentences
if the folder is missing), cached under ~/.cache/savpack/bench_ray (or --cache).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq

from measure import DATA_ROOT, gigabytes, machine_description, write_results
from savpack_runtime.ray_engine import ACTOR_NAME
from savpack_runtime.result import records_agree

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = ROOT / "exported" / "bundles" / "qwen2" / "bundle"
CLI = [sys.executable, "-m", "savpack_runtime.cli"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON results file")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--batch-size", type=int, default=32, help="items per forward and per Ray batch, every run")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to run, comma-separated")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "savpack" / "bench_ray")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one run may take before it is stopped")
    return parser.parse_args()


def items_file(count: int, cache: Path) -> Path:
    """JSONL of `count` text items, made once and cached."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"items-{count}.jsonl"
    if path.exists():
        return path
    texts = [json.loads(line)["text"] for name in ("train", "dev", "test")
             for line in _lines(DATA_ROOT / "sst2" / f"{name}.jsonl")]
    if not texts:
        rng = random.Random(0)
        words = "the film was good bad long short funny dull warm cold a an story plot".split()
        texts = [" ".join(rng.choices(words, k=rng.randint(3, 25))) for _ in range(5000)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": texts[i % len(texts)]}) + "\n" for i in range(count)))
    tmp.replace(path)
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


class TreeSampler:
    """CPU seconds and peak RSS of every process under `root`, sampled until stopped."""

    def __init__(self, root: int, every: float = 0.2):
        self.root, self.every = root, every
        self.processes: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                tree = [psutil.Process(self.root)] + psutil.Process(self.root).children(recursive=True)
            except psutil.Error:
                tree = []
            for process in tree:
                try:
                    with process.oneshot():
                        times = process.cpu_times()
                        entry = self.processes.setdefault(process.pid, {"worker": False})
                        # A Ray worker process takes the actor's title only once the actor runs in it.
                        entry["worker"] = entry["worker"] or ACTOR_NAME in " ".join(process.cmdline())
                        entry["cpu_s"] = times.user + times.system
                        entry["peak_rss"] = max(entry.get("peak_rss", 0), _peak_rss(process.pid) or 0)
                except psutil.Error:
                    continue
            self._stop.wait(self.every)

    def stop(self) -> dict[int, dict[str, Any]]:
        self._stop.set()
        self._thread.join()
        return self.processes


def _peak_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run(name: str, args: list[str], rows_expected: int, timeout: float) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    process = subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(process.pid)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(process.pid).children(recursive=True) + [psutil.Process(process.pid)]:
            child.kill()  # the run this tool started, and the Ray processes it started
        sampler.stop()
        raise SystemExit(f"{name}: stopped after {timeout:.0f} s")
    wall = time.perf_counter() - started
    processes = sampler.stop()
    if process.returncode != 0:
        raise SystemExit(f"{name}: savpack-run failed ({process.returncode}):\n{err[-3000:]}")
    workers = [entry for entry in processes.values() if entry["worker"]]
    first = re.search(r"first rows after ([0-9.]+) s", err)
    result = {
        "name": name, "args": args, "rows": rows_expected, "wall_s": wall, "rows_per_s": rows_expected / wall,
        "cpu_s_total": sum(entry.get("cpu_s", 0) for entry in processes.values()),
        "workers": [{"cpu_s": entry.get("cpu_s"), "peak_rss_bytes": entry.get("peak_rss")} for entry in workers],
        "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
        "driver_peak_rss_bytes": processes.get(process.pid, {}).get("peak_rss"),
    }
    if first:
        result["first_rows_s"] = float(first.group(1))
        result["rows_per_s_after_first_rows"] = rows_expected / max(wall - result["first_rows_s"], 1e-9)
    if workers:
        worker_cpu = sum(entry.get("cpu_s", 0) for entry in workers)
        result["worker_cpu_s"] = worker_cpu
        result["rows_per_worker_cpu_s"] = rows_expected / worker_cpu
        result["worker_cpu_share"] = worker_cpu / (wall * len(workers))
    return result


def main() -> None:
    args = parse_args()
    counts = [int(value) for value in args.workers.split(",")]
    data = items_file(args.items, args.cache)
    common = [str(args.bundle), "--data", str(data), "--batch-size", str(args.batch_size)]
    runs, outputs = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_ray-") as folder:
        plan = [("single, 1 thread", ["--threads", "1"]), ("single, all cores", [])]
        plan += [(f"ray, {count} worker{'s' * (count > 1)}", ["--engine", "ray", "--workers", str(count)]) for count in counts]
        for name, extra in plan:
            out = Path(folder) / f"{len(runs)}.parquet"
            print(f"running {name} ...", file=sys.stderr, flush=True)
            runs.append(run(name, ["classify", *common, "--out", str(out), *extra], args.items, args.timeout))
            outputs[name] = pq.read_table(out)
        reference = outputs[plan[0][0]]
        for entry in runs:
            table = outputs[entry["name"]]
            entry["rows_written"] = table.num_rows
            # Labels, votes and flags exactly, probabilities within the runtime's agreement tolerance (Ray's batches
            # pad differently from the single process's, which moves head vectors in their last bits).
            pairs = list(zip(table.to_pylist(), reference.to_pylist()))
            entry["mismatched_rows"] = sum(not records_agree(row, expected) for row, expected in pairs) \
                + abs(table.num_rows - reference.num_rows)
            entry["equal_to_single"] = entry["mismatched_rows"] == 0
    by_workers = {count: next(entry for entry in runs if entry["name"].startswith(f"ray, {count} ")) for count in counts}
    report = {
        "tool": "bench_ray", "machine": machine_description(), "items": args.items, "bundle": str(args.bundle.resolve().relative_to(ROOT))
        if args.bundle.resolve().is_relative_to(ROOT) else str(args.bundle), "batch_size": args.batch_size, "runs": runs,
    }
    if 1 in by_workers and 2 in by_workers:
        one, two = by_workers[1], by_workers[2]
        report["scaling_2_over_1"] = {
            "rows_per_s": two["rows_per_s"] / one["rows_per_s"],
            "rows_per_s_after_first_rows": two["rows_per_s_after_first_rows"] / one["rows_per_s_after_first_rows"],
            "rows_per_worker_cpu_s": two["rows_per_worker_cpu_s"] / one["rows_per_worker_cpu_s"],
        }
    print(format_table(report))
    write_results(args.out, report)
    print(f"wrote {args.out}", file=sys.stderr)


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['items']:,} items, {report['bundle']}, batch {report['batch_size']}; machine: "
             f"{report['machine']['cores']} cores, {report['machine']['cpu']}", "",
             f"{'run':<18} {'wall s':>7} {'rows/s':>7} {'after 1st':>9} {'cpu s':>7} {'rows/wkr-cpu-s':>14} "
             f"{'wkr share':>9} {'worker peak GB':>16} {'load':>9} {'equal':>5}"]
    for entry in report["runs"]:
        peaks = ",".join(gigabytes(worker["peak_rss_bytes"]) for worker in entry["workers"]) or \
            f"(driver {gigabytes(entry['driver_peak_rss_bytes'])})"
        lines.append(
            f"{entry['name']:<18} {entry['wall_s']:>7.1f} {entry['rows_per_s']:>7.0f} "
            f"{entry.get('rows_per_s_after_first_rows', entry['rows_per_s']):>9.0f} {entry['cpu_s_total']:>7.1f} "
            f"{_fmt(entry.get('rows_per_worker_cpu_s'), '.0f'):>14} {_fmt(entry.get('worker_cpu_share'), '.2f'):>9} "
            f"{peaks:>16} {entry['load_average_before']:>4.1f}-{entry['load_average_after']:<4.1f} "
            f"{'yes' if entry['equal_to_single'] else entry['mismatched_rows']:>5}")
    scaling = report.get("scaling_2_over_1")
    if scaling:
        lines += ["", f"2 workers / 1 worker: rows/s {scaling['rows_per_s']:.2f}x, after first rows "
                      f"{scaling['rows_per_s_after_first_rows']:.2f}x, rows per worker CPU second "
                      f"{scaling['rows_per_worker_cpu_s']:.2f}x"]
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
