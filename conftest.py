"""Fixtures shared by tests/ and runtime/tests/: one local Ray for the whole run (Ray takes seconds to start)."""

from __future__ import annotations

import pytest

RAY_WORKERS = 2


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
