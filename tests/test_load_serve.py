"""tools/load_serve.py on a short run: both modes and two levels, every status counted, the JSON and the table written.
The real measurement (10,000 requests per level) is docs/serving.md's; this checks the tool, not the figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "load_serve.py"), "--threads", "1", "--out", str(out), *options],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.is_file(), done.stderr
    return done, json.loads(out.read_text())


def test_short_run_counts_every_request(tmp_path):
    done, report = _run(tmp_path, "--requests", "60", "--levels", "1,4")
    assert set(report["runs"]) == {"batched", "unbatched"}
    for mode, run in report["runs"].items():
        assert [level["concurrency"] for level in run["levels"]] == [1, 4]
        for level in run["levels"]:
            assert level["requests"] == 60 and level["statuses"] == {"200": 60} and level["unexpected"] == 0
            assert level["throughput_rps"] > 0 and level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"]
        assert run["exit_code"] in (0, -15)  # SIGTERM: drained and exited
    assert report["runs"]["unbatched"]["levels"][1]["mean_batch_items"] == 1.0
    assert report["checks"]["only_2xx_or_429"] and "batched_over_unbatched_c4" in report["ratios"]
    assert "batched      4" in done.stdout and "only_2xx_or_429: yes" in done.stdout


def test_a_full_queue_is_counted_as_429_not_as_an_error(tmp_path):
    """--max-queue 1 with 8 clients and a long --max-wait-ms: most requests are refused with 429, which the tool
    counts apart from unexpected statuses."""
    done, report = _run(tmp_path, "--requests", "40", "--levels", "8", "--modes", "batched", "--max-queue", "1",
                        "--max-wait-ms", "50")
    level = report["runs"]["batched"]["levels"][0]
    assert level["rejected_429"] > 0 and level["ok"] > 0 and level["ok"] + level["rejected_429"] == 40
    assert level["unexpected"] == 0 and report["checks"]["only_2xx_or_429"]


def test_other_statuses_are_unexpected_and_fail_the_run(tmp_path):
    """An item the server refuses (413: a prompt longer than the model's context) is counted as unexpected; the
    check fails and the tool exits 1."""
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"text": "a circle"}) + "\n" + json.dumps({"text": "word " * 5000}) + "\n")
    bundle = ROOT / "exported" / "bundles" / "qwen2" / "bundle"
    done, report = _run(tmp_path, "--requests", "10", "--levels", "2", "--modes", "unbatched", "--bundle", str(bundle),
                        "--items", str(items))
    level = report["runs"]["unbatched"]["levels"][0]
    assert level["statuses"] == {"200": 5, "413": 5} and level["unexpected"] == 5
    assert report["checks"]["only_2xx_or_429"] is False and done.returncode == 1
