"""On a real embedded Ray (2 CPUs): settings that can never fit are refused before any work,
and waits for resources another job holds end with a kiln message instead of hanging."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.data_curation import executors
from kiln.data_curation.executors import RayExecutor
from kiln.data_curation.stage import StageResources
from kiln.resource_fit import ResourceFitError, WaitTimeout
from kiln.training import launch, train
from tests.helpers_training import short_run_config


def _double(phase: str, job: Any, index: int, item: dict[str, Any]) -> dict[str, Any]:
    return {"v": item["value"] * 2}


class _Job:
    step = "match"
    stage = ""
    fingerprint = "f"

    def __init__(self, root: Path) -> None:
        self.root = root

    def marker(self, phase: str, index: int) -> str:
        return f"{self.root}/{phase}-{index}.json"

    def context(self) -> Any:
        return None


@pytest.fixture
def one_cpu_held(ray_session: None) -> Iterator[None]:
    """Another job's actor holding 1 of the embedded Ray's 2 CPUs."""
    import ray

    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()  # type: ignore[attr-defined]
    ray.get(holder.ready.remote(), timeout=120)
    try:
        yield
    finally:
        ray.kill(holder)


def test_actor_pool_bigger_than_the_ray_is_refused(ray_session: None, tmp_path: Path) -> None:
    ex = RayExecutor(_double)
    with pytest.raises(ResourceFitError, match=r"step match: its pool of 3 actors x 1 CPUs"):
        ex.check_plan([("text", StageResources()), ("match", StageResources(actors=3))])
    with pytest.raises(
        ResourceFitError, match=r"a task needs 3 CPUs but the Ray cluster \(1 node\) has 2"
    ):
        ex.run("apply", _Job(tmp_path), [{"value": 1}], resources=StageResources(num_cpus=3))
    results, _ = ex.run("apply", _Job(tmp_path), [{"value": 2}], resources=StageResources())
    assert results == [{"v": 4}]


def test_actors_that_cannot_start_time_out(
    one_cpu_held: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executors, "ACTOR_START_TIMEOUT_S", 3.0)
    monkeypatch.setattr(executors, "_PROGRESS_EVERY_S", 1.0)
    ex = RayExecutor(_double)
    items = [{"value": i} for i in range(4)]
    with pytest.raises(WaitTimeout, match=r"step match: [01] of 2 actors .* started in \d+s"):
        ex.run("apply", _Job(tmp_path), items, resources=StageResources(actors=2))


def test_ray_train_workers_that_cannot_fit_are_refused(
    ray_session: None, short_dataset: str, tmp_path: Path
) -> None:
    with pytest.raises(ResourceFitError, match=r"3 Ray Train workers x 1 CPUs .* has 2"):
        train(short_run_config(short_dataset), str(tmp_path / "run"), num_workers=3)
    assert not (tmp_path / "run" / "ray_train").exists()


@pytest.mark.slow
def test_ray_train_start_times_out_when_another_job_holds_the_cpus(
    one_cpu_held: None, short_dataset: str, tmp_path: Path
) -> None:
    with pytest.raises(WaitTimeout, match=r"Ray Train did not start 2 workers .* within 5s"):
        train(
            short_run_config(short_dataset),
            str(tmp_path / "run"),
            num_workers=2,
            start_timeout_s=5,
        )


def test_a_start_tells_waiting_for_resources_from_starting_processes(
    one_cpu_held: None,
) -> None:
    """The start's progress line reads the state of the run's placement group: pending
    while another job holds the CPUs, created once the workers are placed."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    groups = launch._placement_groups()
    assert groups is not None
    known = set(groups)
    assert launch._group_state(known, 2) == ""  # no group yet: the controller is starting
    waiting = placement_group([{"CPU": 1}] * 2)  # 2 CPUs, one of them held
    placed = placement_group([{"CPU": 1}])
    try:
        ray.get(placed.ready(), timeout=60)
        assert launch._group_state(known, 2) == "PENDING"
        assert launch._group_state(known, 1) == "CREATED"
        said = launch._start_progress("PENDING", "2 workers", 12, 600)
        assert said.startswith("waiting for the cluster to free the resources of 2 workers")
    finally:
        remove_placement_group(waiting)
        remove_placement_group(placed)
