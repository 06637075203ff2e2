"""tools/bench_ray.py end to end on a few hundred items: every run's rows equal, workers found and measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.data", reason="needs the ray extra")
pytestmark = pytest.mark.slow  # three local Rays started by the tool's runs

ROOT = Path(__file__).resolve().parent.parent


def test_small_run_measures_every_engine(tmp_path):
    out = tmp_path / "ray.json"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_ray.py"), "--items", "300", "--out", str(out),
                             "--cache", str(tmp_path / "cache"), "--batch-size", "16"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    names = [run["name"] for run in report["runs"]]
    assert names == ["single, 1 thread", "single, all cores", "ray, 1 worker", "ray, 2 workers"]
    for run in report["runs"]:
        assert run["rows_written"] == 300 and run["equal_to_single"], run["name"]
    workers = {run["name"]: run["workers"] for run in report["runs"]}
    assert len(workers["ray, 1 worker"]) == 1 and len(workers["ray, 2 workers"]) == 2
    assert all(worker["peak_rss_bytes"] > 50 * 2**20 and worker["cpu_s"] > 0 for worker in workers["ray, 2 workers"])
    assert report["scaling_2_over_1"]["rows_per_s"] > 0
    assert "2 workers / 1 worker" in result.stdout
    assert len((tmp_path / "cache" / "items-300.jsonl").read_text().splitlines()) == 300
