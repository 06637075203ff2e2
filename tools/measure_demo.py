#!/usr/bin/env python3
"""Time `savpack demo` the way a newcomer meets it: a first run on an empty cache (assembling and converting
Gemma-3-270M, exporting the bundle) and a second run right after (everything reused that can be), each under
`/usr/bin/time -v` in its own process.

Reports per run: wall time, CPU time (user + system: what the machine's other work cannot inflate), peak RSS, the
load average before and after (the machine may be shared), the demo's own step times and its accuracy. Prints a
table and writes JSON to --out.

    python tools/measure_demo.py --out demo-timing.json                # a fresh temporary cache, removed afterwards
    python tools/measure_demo.py --out demo-timing.json --cache DIR    # keep the cache (a second call measures warm runs)
    python tools/measure_demo.py --out t.json --runs 1 --demo-args "--model ./tiny"   # any other demo options
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIME_FIELDS = {
    "wall_s": r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)",
    "user_s": r"User time \(seconds\): (\S+)",
    "system_s": r"System time \(seconds\): (\S+)",
    "max_rss_kb": r"Maximum resident set size \(kbytes\): (\d+)",
    "exit_status": r"Exit status: (\d+)",
}


def _clock(text: str) -> float:
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def _load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def measure_once(savpack: str, cache: Path, workdir: Path, extra: list[str], log: Path) -> dict:
    env = {**os.environ, "SAVPACK_CACHE": str(cache)}
    before = _load_average()
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.run(["/usr/bin/time", "-v", savpack, "demo", "--workdir", str(workdir), *extra],
                                 stdout=handle, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - started
    text = log.read_text(errors="replace")
    run: dict = {"load_average_before": before, "load_average_after": _load_average(), "measured_wall_s": round(wall, 1),
                 "exit_code": process.returncode, "log": str(log)}
    for name, pattern in TIME_FIELDS.items():
        found = re.search(pattern, text)
        if found:
            run[name] = _clock(found.group(1)) if name == "wall_s" else float(found.group(1))
    run["cpu_s"] = round(run.get("user_s", 0) + run.get("system_s", 0), 1)
    accuracy = re.search(r"Result: ([0-9.]+) accuracy on (\d+) held-out", text)
    if accuracy:
        run["accuracy"], run["held_out"] = float(accuracy.group(1)), int(accuracy.group(2))
    steps = re.findall(r"\[\d+/\d+\] (\S+?)[: ].*?done in ([0-9.]+) s", text, flags=re.S)
    run["steps_s"] = {name: float(seconds) for name, seconds in steps}
    run["reused_bundle"] = "reused, not exported again" in text
    run["converted_model"] = "converted now" in text
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--cache", type=Path, default=None, help="SAVPACK_CACHE for the runs (default: a fresh temporary folder)")
    parser.add_argument("--runs", type=int, default=2, help="runs in a row (default 2: first and second)")
    parser.add_argument("--savpack", default=shutil.which("savpack") or str(Path(sys.executable).parent / "savpack"))
    parser.add_argument("--demo-args", default="", help="more options for savpack demo, quoted")
    args = parser.parse_args(argv)
    temporary = None if args.cache else tempfile.mkdtemp(prefix="savpack-demo-cache-")
    cache = args.cache or Path(temporary)
    try:
        runs = []
        for number in range(1, args.runs + 1):
            log = args.out.with_name(f"{args.out.stem}-run{number}.log")
            runs.append(measure_once(args.savpack, cache, cache / "demo", shlex.split(args.demo_args), log))
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
    result = {"command": f"savpack demo {args.demo_args}".strip(), "fresh_cache": temporary is not None,
              "cpus": os.cpu_count(), "runs": runs}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'run':<4} {'wall s':>7} {'cpu s':>6} {'peak RSS GB':>11} {'load before':>17} {'load after':>17} "
          f"{'accuracy':>8}  steps (s)")
    for number, run in enumerate(runs, 1):
        steps = ", ".join(f"{name} {seconds:.0f}" for name, seconds in run["steps_s"].items())
        print(f"{number:<4} {run.get('wall_s', float('nan')):>7.1f} {run['cpu_s']:>6.1f} "
              f"{run.get('max_rss_kb', 0) / 1e6:>11.2f} {str(run['load_average_before']):>17} "
              f"{str(run['load_average_after']):>17} {run.get('accuracy', float('nan')):>8.3f}  {steps}")
    return 0 if all(run["exit_code"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
