"""Connect to Ray: an explicit cluster address, or an embedded Ray bound to 127.0.0.1.

Ray binds its services to the host's routable address by default; an embedded kiln run must
never listen beyond loopback, so with no address we pin the node IP to 127.0.0.1 and set
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (which makes Ray's own IP detection answer loopback).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

__all__ = ["LOOPBACK", "ray_session", "say", "start_ray"]

LOOPBACK = "127.0.0.1"


def start_ray(
    address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = True
) -> bool:
    """Initialise Ray unless it already is; returns True when this call started it.

    `address=None` starts a private single-node Ray on loopback (never one named by
    RAY_ADDRESS or already running on the machine); any other value connects to that
    cluster (kiln never guesses an address). Says on stderr which of the two it did. `dashboard=False` starts the embedded
    Ray without its dashboard (about 1 GB and several CPU-seconds less), for work that does
    not use Ray's State API (curation; Ray Train needs it).
    """
    if address is None:
        # Read by Ray at import time, so also patch the constant in case Ray is imported already;
        # the env var reaches the raylet and workers Ray spawns.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return False
    if address is None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    kwargs: dict[str, object] = {"logging_level": logging.WARNING, "configure_logging": True}
    if address is None:
        # address="local": a private instance, even when RAY_ADDRESS is set or another Ray
        # runs on this machine (ray.init(address=None) would join those). The dashboard
        # serves Ray's State API, which Ray Train's controller polls (without it a cleaner
        # actor logs a warning every few seconds); keep it on loopback too.
        say(f"starting a private Ray on {LOOPBACK} (no address given)")
        ray.init(
            address="local",
            num_cpus=num_cpus,
            _node_ip_address=LOOPBACK,
            include_dashboard=dashboard,
            dashboard_host=LOOPBACK,
            **kwargs,  # type: ignore[arg-type]
        )
        node_ip = ray.util.get_node_ip_address()
        if node_ip != LOOPBACK:
            ray.shutdown()
            raise RuntimeError(
                f"embedded Ray came up on {node_ip}, not {LOOPBACK}: refusing to run with "
                "services reachable from the network; unset RAY_ADDRESS / check Ray's version"
            )
    else:
        say(f"joining the Ray cluster at {address}")
        ray.init(address=address, **kwargs)  # type: ignore[arg-type]
    return True


def say(message: str) -> None:
    """One of kiln's own `[kiln] ...` lines, on stderr."""
    sys.stderr.write(f"[kiln] {message}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def ray_session(
    address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = True
) -> Iterator[None]:
    """Ray for the duration of a block; shuts down only a Ray this block started."""
    import ray

    started = start_ray(address, num_cpus=num_cpus, dashboard=dashboard)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
