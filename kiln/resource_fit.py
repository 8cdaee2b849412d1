"""Refuse resource asks the Ray a job runs on can never satisfy, before anything starts.

Ray queues a request it cannot place and waits for resources that never come: an actor
pool larger than the cluster, a task bigger than any node, more Ray Train workers than CPUs
all hung forever without a word. These checks turn such settings into one error naming the
setting, what it asks, what the cluster has and the fix.

They are pure functions of a `Capacity`, so they run twice: before Ray starts, against what
the embedded Ray will have (`embedded_capacity`: ``ray.num_cpus`` or this machine's CPUs;
what a dry run can check), and once Ray is up, against the live cluster (`ray_capacity`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "RAY_START_TIMEOUT_S",
    "Capacity",
    "ResourceFitError",
    "StageResources",
    "WaitTimeout",
    "check_plan_fits",
    "check_train_fits",
    "embedded_capacity",
    "ray_capacity",
    "stage_fit_problem",
    "usable_cpus",
]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count; the
    machine's count where there is no mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


#: How long Ray Train may take to start a run's workers (`resources.start_timeout_s`).
RAY_START_TIMEOUT_S = 600.0


class StageResources(Protocol):
    """What a stage asks per task (`kiln.data_curation.stage.StageResources`)."""

    @property
    def num_cpus(self) -> float: ...

    @property
    def num_gpus(self) -> float: ...

    @property
    def actors(self) -> int | None: ...


class ResourceFitError(ValueError):
    """A resource setting the Ray it runs on can never satisfy; the message has the fix."""


class WaitTimeout(RuntimeError):
    """Something kiln waited for on Ray (actors, Ray Train workers) did not come in time;
    the message names what it waited for and what to check."""


@dataclass(frozen=True)
class Capacity:
    """What a Ray can give: totals, the largest node, and how to get more."""

    cpus: float
    node_cpus: float  # CPUs of the largest node
    nodes: int
    gpus: float | None  # None: not known (the embedded Ray before it starts)
    node_gpus: float | None
    where: str  # "the embedded Ray (ray.num_cpus=2)", "the Ray cluster"
    more: str  # how to get more CPUs: "raise ray.num_cpus", "add nodes to the cluster"


def embedded_capacity(num_cpus: int | None) -> Capacity:
    """What `kiln.platform.ray_cluster.start_ray(num_cpus=...)` will give on this machine
    (GPUs are not counted before Ray starts)."""
    cpus = float(num_cpus if num_cpus is not None else (os.cpu_count() or 1))
    where = (
        f"the embedded Ray (ray.num_cpus={num_cpus})"
        if num_cpus is not None
        else f"the embedded Ray (this machine's {cpus:g} CPUs)"
    )
    more = "raise ray.num_cpus" if num_cpus is not None else "use a machine or cluster with more"
    return Capacity(cpus, cpus, 1, None, None, where, more)


def ray_capacity() -> Capacity:
    """What the Ray this process is connected to has (alive nodes, total resources)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus = [float(n.get("CPU", 0.0)) for n in nodes] or [0.0]
    gpus = [float(n.get("GPU", 0.0)) for n in nodes] or [0.0]
    cluster = len(nodes) > 1
    where = f"the Ray cluster ({len(nodes)} node{'s' if cluster else ''})"
    more = "add nodes to the cluster" if cluster else "raise ray.num_cpus or join a cluster"
    return Capacity(sum(cpus), max(cpus), len(nodes), sum(gpus), max(gpus), where, more)


def stage_fit_problem(step: str, res: StageResources, cap: Capacity) -> str | None:
    """Why `step`'s tasks or actor pool can never all be placed on `cap`, or None."""
    if res.num_cpus > cap.node_cpus:
        biggest = "the largest node of " if cap.nodes > 1 else ""
        return (
            f"step {step}: a task needs {res.num_cpus:g} CPUs but {biggest}{cap.where} has "
            f"{cap.node_cpus:g}: lower the stage's resources.num_cpus, or {cap.more}"
        )
    if cap.node_gpus is not None and res.num_gpus > cap.node_gpus:
        return (
            f"step {step}: a task needs {res.num_gpus:g} GPUs but {cap.where} has "
            f"{cap.node_gpus:g} per node: lower the stage's resources.num_gpus"
        )
    if res.actors:
        need = res.actors * res.num_cpus
        if need > cap.cpus:
            return (
                f"step {step}: its pool of {res.actors} actors x {res.num_cpus:g} CPUs needs "
                f"{need:g} CPUs at once but {cap.where} has {cap.cpus:g}: lower the stage's "
                f"resources.actors or resources.num_cpus, or {cap.more}"
            )
        if cap.gpus is not None and res.actors * res.num_gpus > cap.gpus:
            return (
                f"step {step}: its pool of {res.actors} actors x {res.num_gpus:g} GPUs needs "
                f"{res.actors * res.num_gpus:g} GPUs but {cap.where} has {cap.gpus:g}: lower "
                "the stage's resources.actors or resources.num_gpus"
            )
    return None


def check_plan_fits(steps: Iterable[tuple[str, StageResources]], cap: Capacity) -> None:
    """Raise `ResourceFitError` for the first (step name, resources) `cap` cannot run."""
    for step, res in steps:
        problem = stage_fit_problem(step, res, cap)
        if problem:
            raise ResourceFitError(problem)


def check_train_fits(
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    placement: str,
    cap: Capacity,
) -> None:
    """Raise `ResourceFitError` when `workers` Ray Train workers of this size, placed as
    `placement` says, can never all start on `cap` (Ray Train would wait for them)."""
    fix = f"lower resources.workers or resources.cpus_per_worker, or {cap.more}"
    total = workers * cpus_per_worker
    if total > cap.cpus:
        raise ResourceFitError(
            f"{workers} Ray Train workers x {cpus_per_worker:g} CPUs (resources.workers x "
            f"resources.cpus_per_worker) need {total:g} CPUs but {cap.where} has "
            f"{cap.cpus:g}: {fix}"
        )
    if cpus_per_worker > cap.node_cpus:
        raise ResourceFitError(
            f"a Ray Train worker needs {cpus_per_worker:g} CPUs (resources.cpus_per_worker) "
            f"but the largest node of {cap.where} has {cap.node_cpus:g}: {fix}"
        )
    if placement == "strict_pack" and total > cap.node_cpus:
        raise ResourceFitError(
            f"placement strict_pack puts all {workers} workers ({total:g} CPUs) on one node "
            f"but the largest node of {cap.where} has {cap.node_cpus:g} CPUs: use placement "
            f"pack, or {fix}"
        )
    if placement == "strict_spread" and workers > cap.nodes:
        raise ResourceFitError(
            f"placement strict_spread puts each of the {workers} workers on its own node but "
            f"{cap.where} has {cap.nodes}: use placement spread, lower resources.workers, or "
            "add nodes to the cluster"
        )
    if cap.gpus is None or gpus_per_worker <= 0:
        return
    if workers * gpus_per_worker > cap.gpus or gpus_per_worker > (cap.node_gpus or 0):
        raise ResourceFitError(
            f"{workers} Ray Train workers x {gpus_per_worker:g} GPUs "
            f"(resources.gpus_per_worker) cannot be placed: {cap.where} has "
            f"{cap.gpus:g} GPUs, {cap.node_gpus or 0:g} on its largest node: lower "
            "resources.workers or resources.gpus_per_worker"
        )
