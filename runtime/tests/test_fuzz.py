"""A short seeded run of tools/fuzz_pack.py: hostile bytes only ever raise savpack's named pack errors."""

import pytest

pytest.importorskip("hypothesis")

import fuzz_pack as fuzz  # noqa: E402  (tools/, after the hypothesis check)


def test_seeded_fuzz_run_has_no_crash():
    report = fuzz.run(1200, seed=20261123, time_limit=5.0)
    assert report["cases"] == 1200
    assert report["crashes"] == 0, report["crash_examples"][:3]
    # the run reached the deep validators, not only the byte-level checks
    assert {"PackSizeError", "PackHeaderError", "PackTypeError", "PackShapeError"} <= set(report["outcomes"])
