"""Resource settings a Ray can never satisfy are refused with the setting and the fix
(pure checks against a capacity: the same ones run before Ray starts and against the live
cluster; tests/integration/test_resource_limits.py runs them on a real Ray)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from kiln.data_curation.stage import StageResources
from kiln.platform.api import check_resources
from kiln.platform.recipes import parse_recipe
from kiln.resource_fit import (
    Capacity,
    ResourceFitError,
    check_plan_fits,
    check_train_fits,
    embedded_capacity,
)

TWO = embedded_capacity(2)
CLUSTER = Capacity(8, 4, 2, 2, 1, "the Ray cluster (2 nodes)", "add nodes to the cluster")


def test_embedded_capacity_is_ray_num_cpus_or_this_machine() -> None:
    assert (TWO.cpus, TWO.node_cpus, TWO.nodes, TWO.gpus) == (2, 2, 1, None)
    assert "ray.num_cpus=2" in TWO.where and "raise ray.num_cpus" in TWO.more
    assert embedded_capacity(None).cpus == (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("res", "message"),
    [
        (StageResources(num_cpus=3), r"step match: a task needs 3 CPUs .* has 2: lower"),
        (StageResources(num_cpus=2, actors=2), r"pool of 2 actors x 2 CPUs needs 4 CPUs"),
        (StageResources(num_cpus=1, actors=3), r"needs 3 CPUs at once .* raise ray\.num_cpus"),
    ],
)
def test_plans_that_cannot_fit_the_embedded_ray_are_refused(
    res: StageResources, message: str
) -> None:
    with pytest.raises(ResourceFitError, match=message):
        check_plan_fits([("text", StageResources()), ("match", res)], TWO)


def test_plans_that_fit_pass() -> None:
    check_plan_fits([("a", StageResources(num_cpus=2)), ("b", StageResources(actors=2))], TWO)
    check_plan_fits([("c", StageResources(num_cpus=4, actors=2))], CLUSTER)


def test_a_cluster_checks_the_largest_node_and_gpus() -> None:
    with pytest.raises(ResourceFitError, match=r"largest node of the Ray cluster .* has 4"):
        check_plan_fits([("s", StageResources(num_cpus=5))], CLUSTER)
    with pytest.raises(ResourceFitError, match=r"3 actors x 1 GPUs needs 3 GPUs"):
        check_plan_fits([("s", StageResources(num_gpus=1, actors=3))], CLUSTER)


def test_training_that_cannot_fit_is_refused() -> None:
    check_train_fits(2, 1, 0, "pack", TWO)
    with pytest.raises(ResourceFitError, match=r"2 Ray Train workers x 2 CPUs .* need 4 CPUs"):
        check_train_fits(2, 2, 0, "pack", TWO)
    with pytest.raises(ResourceFitError, match=r"a Ray Train worker needs 6 CPUs"):
        check_train_fits(1, 6, 0, "pack", CLUSTER)
    with pytest.raises(ResourceFitError, match=r"strict_pack puts all 3 workers \(6 CPUs\)"):
        check_train_fits(3, 2, 0, "strict_pack", CLUSTER)
    with pytest.raises(ResourceFitError, match=r"strict_spread .* 3 workers"):
        check_train_fits(3, 1, 0, "strict_spread", CLUSTER)
    with pytest.raises(ResourceFitError, match=r"resources.gpus_per_worker"):
        check_train_fits(2, 1, 2, "pack", CLUSTER)
    check_train_fits(2, 1, 1, "spread", CLUSTER)


def _recipe(**over: object) -> dict[str, object]:
    return {
        "kind": "train",
        "name": "t",
        "run_dir": "runs/t",
        "data": {"dataset": "runs/ds"},
        "model": {"flavor": "clip-tiny"},
        **over,
    }


def test_recipes_are_checked_before_ray_starts() -> None:
    too_big = parse_recipe(_recipe(ray={"num_cpus": 1}, resources={"workers": 2}))
    with pytest.raises(ResourceFitError, match=r"embedded Ray \(ray.num_cpus=1\)"):
        check_resources(too_big)  # type: ignore[arg-type]
    # the local launcher runs no Ray; a cluster is checked once joined
    check_resources(parse_recipe(_recipe(ray={"num_cpus": 1}, resources={"launcher": "local"})))  # type: ignore[arg-type]
    check_resources(parse_recipe(_recipe(ray={"address": "ray://h:10001", "num_cpus": 1})))  # type: ignore[arg-type]


def test_joining_a_cluster_nobody_runs_fails_in_seconds_naming_the_address() -> None:
    """In a fresh process (start_ray leaves a Ray already running in its process alone, as
    the full suite's session Ray would be here)."""
    from kiln.training.launch import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    code = (
        "import ray\n"
        "from kiln.platform.ray_cluster import start_ray\n"
        "from kiln.resource_fit import WaitTimeout\n"
        "try:\n"
        f"    start_ray({address!r})\n"
        "except WaitTimeout as e:\n"
        "    print('WaitTimeout:', e)\n"
        "print('initialized:', ray.is_initialized())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    ).stdout
    assert re.search(rf"WaitTimeout: no Ray cluster answers at {address} .*--address", out), out
    assert "initialized: False" in out
