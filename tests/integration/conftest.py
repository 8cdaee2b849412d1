"""Integration fixtures: one embedded Ray per test session, bound to 127.0.0.1 only."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """An embedded single-node Ray (2 CPUs, loopback, no dashboard), shut down at the end.

    Reuses a Ray that is already initialised (another fixture started it) and then leaves
    shutting it down to its owner.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    try:
        yield
    finally:
        ray.shutdown()
