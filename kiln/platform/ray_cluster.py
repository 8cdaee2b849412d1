"""Connect to Ray: an explicit cluster address, or an embedded Ray bound to 127.0.0.1.

Ray binds its services to the host's routable address by default; an embedded kiln run must
never listen beyond loopback, so with no address we pin the node IP to 127.0.0.1 and set
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (which makes Ray's own IP detection answer loopback).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil

from kiln.console import say
from kiln.platform import logs, signals
from kiln.resource_fit import WaitTimeout

__all__ = ["JOIN_TIMEOUT_S", "LOOPBACK", "ray_session", "start_ray"]

LOOPBACK = "127.0.0.1"
#: Starts of a private Ray before kiln gives up on one whose processes miss Ray's deadline.
_START_ATTEMPTS = 2
#: What Ray's Exception says when the raylet did not register in time (ray._private.node).
_STARTUP_TIMEOUT = "timed out during startup"
#: How long joining a cluster waits for its address to answer before failing.
JOIN_TIMEOUT_S = 10.0
#: read by Ray's State API client (Ray Train's actors use it): without it a worker looks
#: for "the" Ray on the machine and fails when several run (one per kiln run)
_API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


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
        # A private instance reports nothing anywhere: Ray's usage-stats reporter would
        # otherwise try an outside address (a user opts in with RAY_USAGE_STATS_ENABLED=1).
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    imported = sys.modules.get("ray")
    if imported is not None and imported.is_initialized():
        return False
    started = time.perf_counter()  # importing Ray takes seconds: say so before
    if address is None:
        say(f"starting a private Ray on {LOOPBACK} (no address given)", stream=sys.stderr)
    else:
        say(f"joining the Ray cluster at {address}", stream=sys.stderr)
    import ray
    from ray._private import ray_constants

    if address is None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    # with kiln's CLI logging (kiln.platform.logs), Ray's driver logs go to the run log:
    # Ray must not put its own terminal handler back
    logs.capture_library_loggers()
    kwargs: dict[str, object] = {
        "logging_level": logging.WARNING,
        "configure_logging": not logs.is_configured(),
    }
    if address is None:
        # address="local": a private instance, even when RAY_ADDRESS is set or another Ray
        # runs on this machine (ray.init(address=None) would join those). The dashboard
        # serves Ray's State API, which Ray Train's controller polls (without it a cleaner
        # actor logs a warning every few seconds); keep it on loopback too.
        if dashboard:
            from kiln.training.launch import free_port

            # its workers (Ray Train's controller) find its State API by this variable,
            # inherited through the raylet, not by looking for "the" Ray on the machine
            kwargs["dashboard_port"] = free_port()
            os.environ[_API_SERVER_ENV] = f"http://{LOOPBACK}:{kwargs['dashboard_port']}"
        with logs.process_output_to_log():  # Ray's own processes log to the run dir
            _init_private(
                ray,
                address="local",
                num_cpus=num_cpus,
                _node_ip_address=LOOPBACK,
                include_dashboard=dashboard,
                dashboard_host=LOOPBACK,
                **kwargs,
            )
        node_ip = ray.util.get_node_ip_address()
        if node_ip != LOOPBACK:
            ray.shutdown()
            raise RuntimeError(
                f"embedded Ray came up on {node_ip}, not {LOOPBACK}: refusing to run with "
                "services reachable from the network; unset RAY_ADDRESS / check Ray's version"
            )
    else:
        _check_reachable(address)
        with logs.process_output_to_log():
            ray.init(address=address, **kwargs)  # type: ignore[arg-type]
    signals.reclaim()  # ray.init put its own SIGTERM handler (a stack dump, then abort)
    logs.capture_library_loggers()
    logs.route_ray_worker_output()
    say(f"Ray ready ({time.perf_counter() - started:.0f}s)", stream=sys.stderr)
    return True


def _init_private(ray: Any, **init_kwargs: Any) -> None:
    """`ray.init` of a private Ray, started once more when its processes miss Ray's own
    startup deadline (the raylet has 30 s to register, hard-coded in Ray; a machine busy
    enough misses it, and Ray then raises a bare Exception and leaves the processes it
    started running). The processes of the failed start are stopped first; a second miss
    is a `WaitTimeout` that says what to do."""
    for attempt in range(1, _START_ATTEMPTS + 1):
        before = {p.pid for p in psutil.Process().children()}
        try:
            ray.init(**init_kwargs)
            return
        except Exception as e:
            if _STARTUP_TIMEOUT not in str(e):
                raise
        _stop_new_children(before)
        ray.shutdown()
        load = os.getloadavg()[0]
        missed = (
            f"Ray's processes did not come up within the 30 s Ray gives them (load average "
            f"{load:.1f} on {os.cpu_count()} cores)"
        )
        if attempt == _START_ATTEMPTS:
            raise WaitTimeout(
                f"{missed}, {attempt} times: this machine is too busy to start a Ray now; "
                "run again when it is less loaded, or start one yourself (`ray start --head "
                f"--node-ip-address {LOOPBACK}`) and pass its address (--address)"
            )
        say(f"{missed}; starting it once more", stream=sys.stderr)


def _stop_new_children(before: set[int]) -> None:
    """SIGKILL the child processes (and their own children) this process started since
    `before` (a set of its children's pids): the remains of a failed Ray start."""
    procs = []
    for child in psutil.Process().children():
        if child.pid not in before:
            with contextlib.suppress(psutil.Error):
                procs += [child, *child.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def _check_reachable(address: str, timeout_s: float = JOIN_TIMEOUT_S) -> None:
    """Fail in seconds, naming the address, when nothing listens at a cluster's HOST:PORT
    (``ray.init`` would retry for minutes with Ray's own warnings); `auto` and addresses
    without a port are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise WaitTimeout(
            f"no Ray cluster answers at {address} ({e.strerror or type(e).__name__}, waited "
            f"up to {timeout_s:.0f}s): start it (`ray start --head` on the head node) or fix "
            "ray.address / --address (HEAD:6379, or ray://HEAD:10001 for Ray Client)"
        ) from e


@contextlib.contextmanager
def ray_session(
    address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = True
) -> Iterator[None]:
    """Ray for the duration of a block; shuts down only a Ray this block started."""
    import ray

    api_server = os.environ.get(_API_SERVER_ENV)
    started = start_ray(address, num_cpus=num_cpus, dashboard=dashboard)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
            if api_server is None:  # the next private Ray gets its own
                os.environ.pop(_API_SERVER_ENV, None)
            else:
                os.environ[_API_SERVER_ENV] = api_server
