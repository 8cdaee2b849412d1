"""Integration fixtures: one embedded Ray per test session, bound to 127.0.0.1 only; one
two-node Ray cluster for the tests that need a real cluster; the short reference run that
restarted and multi-node runs are compared with."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kiln.platform.ray_cluster import start_ray
from tests.helpers_datasets import write_tiny_dataset
from tests.helpers_ray_cluster import LoopbackCluster
from tests.helpers_training import SHORT_RUN_STEPS, short_run_config

RAY_SESSION = "ray_session"
TWO_NODE_CLUSTER = "two_node_cluster"


class _LastUse:
    """The session fixtures stopped after the last test that uses them, not at the
    session's end (idle, a Ray still takes CPU from every test after it: its dashboard
    agent alone samples every process every few seconds): how many collected tests still
    need each, and what stops each once it is up."""

    left: ClassVar[dict[str, int]] = {}
    stop: ClassVar[dict[str, Callable[[], None]]] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    for name in (RAY_SESSION, TWO_NODE_CLUSTER):
        _LastUse.left[name] = sum(name in getattr(i, "fixturenames", ()) for i in session.items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    # after the test's own fixtures are torn down: they may still use the shared one (a
    # fixture that holds an actor on the session's Ray kills it in its teardown)
    try:
        yield
    finally:
        for name in set(getattr(item, "fixturenames", ())) & _LastUse.left.keys():
            _LastUse.left[name] -= 1
            if _LastUse.left[name] <= 0 and name in _LastUse.stop:
                _LastUse.stop.pop(name)()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """The embedded Ray kiln starts for a user (2 CPUs, loopback, with the dashboard that
    Ray Train's controller polls), shut down after its last test, unless something else
    had started it."""
    import ray

    started = start_ray(num_cpus=2)
    if started:
        _LastUse.stop[RAY_SESSION] = ray.shutdown
    try:
        yield
    finally:
        _LastUse.stop.pop(RAY_SESSION, lambda: None)()  # not yet stopped: -k, -x


@pytest.fixture(scope="session")
def two_node_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LoopbackCluster, list[dict[str, Any]]]]:
    """A started two-node loopback cluster (`tests.helpers_ray_cluster`) and its nodes,
    shared by the tests that need one (starting one takes ~15 s). Its `env` is what a
    `kiln` client needs: the auth token, KILN_ADDRESS (the dashboard, where jobs are
    submitted), and this venv's `python` first on PATH, as a cluster image would have."""
    cluster = LoopbackCluster(tmp_path_factory.mktemp("two-node-cluster"))
    path = cluster.env.get("PATH", "")
    cluster.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{path}"
    # stopped in a thread: its nodes wind down their workers for up to ~20 s, mostly
    # waiting, while the next tests run; the teardown below waits for that thread
    stopping = threading.Thread(target=cluster.stop, name="stop-two-node-cluster")
    try:
        nodes = cluster.start()
        cluster.env["KILN_ADDRESS"] = cluster.dashboard_url
        _LastUse.stop[TWO_NODE_CLUSTER] = stopping.start
        yield cluster, nodes
    finally:
        _LastUse.stop.pop(TWO_NODE_CLUSTER, None)
        if stopping.is_alive():
            stopping.join()
        cluster.stop()  # a no-op once stopped


@pytest.fixture(scope="session")
def short_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The dataset `short_run_config` trains on (48 tiny samples: 6 steps per epoch)."""
    return str(write_tiny_dataset(tmp_path_factory.mktemp("short") / "ds", num_samples=48))


@pytest.fixture(scope="session")
def short_reference_run(short_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`short_run_config` trained on 2 ranks, uninterrupted, local launcher: the run whose
    losses and weights restarted, multi-node and Ray Train runs must reproduce."""
    from kiln.training import train

    run = tmp_path_factory.mktemp("short") / "reference"
    summary = train(short_run_config(short_dataset), str(run), num_workers=2, launcher="local")
    assert (summary.last_step, summary.restarts) == (SHORT_RUN_STEPS, 0)
    assert len(set(summary.losses)) > 1
    return run


@pytest.fixture(scope="session")
def short_reference(short_reference_run: Path) -> list[float]:
    """Per-step losses of `short_reference_run`."""
    records = [
        json.loads(x) for x in (short_reference_run / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [float(r["loss"]) for r in records]
    assert [r["step"] for r in records] == list(range(1, SHORT_RUN_STEPS + 1))
    return losses
