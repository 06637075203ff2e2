"""A short seeded run of tools/fuzz_pack.py: hostile bytes only ever raise savpack's named pack errors."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")
TOOL = Path(__file__).resolve().parents[2] / "tools" / "fuzz_pack.py"


def test_seeded_fuzz_run_has_no_crash():
    spec = importlib.util.spec_from_file_location("fuzz_pack", TOOL)
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    report = fuzz.run(1200, seed=20261123, time_limit=5.0)
    assert report["cases"] == 1200
    assert report["crashes"] == 0, report["crash_examples"][:3]
    # the run reached the deep validators, not only the byte-level checks
    assert {"PackSizeError", "PackHeaderError", "PackTypeError", "PackShapeError"} <= set(report["outcomes"])
