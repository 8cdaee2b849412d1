"""Integration fixtures: one embedded Ray per test session, bound to 127.0.0.1 only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kiln.platform.ray_cluster import start_ray


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """The embedded Ray kiln starts for a user (2 CPUs, loopback, no dashboard).

    Shut down at the end of the session, unless something else had started it.
    """
    import ray

    started = start_ray(num_cpus=2)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
