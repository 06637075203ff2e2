"""Fixtures shared by tests/ and runtime/tests/: one local Ray for the whole run (Ray takes seconds to start), and a
time limit for tests that could hang (a stalled Ray pipeline waits forever)."""

from __future__ import annotations

import faulthandler
import sys

import pytest

RAY_WORKERS = 2
TIME_LIMIT_S = 600  # per test; the slowest Ray test takes ~1 min on a loaded 2-core machine


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray sized for 2 workers, started once per test session and shared by every Ray test."""
    pytest.importorskip("ray.data", reason="needs the ray extra")
    import ray

    from savpack_runtime.ray_engine import RayOptions, connect

    started = connect(RayOptions(workers=RAY_WORKERS))
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def time_limit():
    """Past TIME_LIMIT_S, print every thread's stack and end the test run (CI fails instead of hanging)."""
    faulthandler.dump_traceback_later(TIME_LIMIT_S, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()
