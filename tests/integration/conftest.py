"""Integration fixtures: one embedded Ray per test session, bound to 127.0.0.1 only; the
short reference run that restarted and multi-node runs are compared with."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.platform.ray_cluster import start_ray
from tests.helpers_datasets import write_tiny_dataset
from tests.helpers_training import SHORT_RUN_STEPS, short_run_config


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
