"""Binding CPU ranks and their loader workers to cores (`resources.bind_cores`), and
whether a rank's loader workers get processes of their own (`data.worker_processes`).

Unbound, the kernel runs a rank's loader worker on whichever core is free at the moment,
which is often the rank's own: on 2 cores, a 1-rank `clip-tiny` run had its training
thread preempted about 300 times a second. Bound, each local rank computes on cores of its
own (`cpus_per_worker` of them, in local-rank order over the cores this process may use)
and its loader workers run on the cores no rank computes on, or on all of them when none
are left. The same idea as DeepSpeed's ``--bind_cores_to_rank``, for every kiln launcher.

A loader worker process earns its keep on a core the ranks leave free: it decodes while
its rank computes. When the node's ranks have a thread on every core, it only takes turns
with them, and costs its batches' hand-over and the switching: at 2 ranks of 1 thread on
2 cores, `clip-tiny` trained 6-16% faster with the workers in the ranks' processes (the
same batches), so ``data.worker_processes: auto`` puts them there (`loader_in_rank`);
GPU ranks keep worker processes, their threads mostly waiting on the GPU.

Binding assumes the run has these cores to itself (a machine, a container's cpuset, a
Slurm allocation): a bound rank cannot move away from another busy process on its core.
Hence off by default. Numerics do not change: the same threads do the same work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence

from kiln.resource_fit import usable_cpus

__all__ = [
    "CoreBinding",
    "allowed_cores",
    "bind_process",
    "bind_rank",
    "bind_worker",
    "loader_in_rank",
    "plan_cores",
]


@dataclasses.dataclass(frozen=True)
class CoreBinding:
    """Where one rank computes (`rank`) and where its loader workers run (`loader`)."""

    rank: tuple[int, ...]
    loader: tuple[int, ...]
    spare: bool  # whether `loader` are cores no rank computes on


def allowed_cores() -> tuple[int, ...] | None:
    """The cores this process may run on (its affinity mask), or None where the platform
    cannot bind (no ``sched_setaffinity``: macOS, Windows)."""
    if not hasattr(os, "sched_getaffinity") or not hasattr(os, "sched_setaffinity"):
        return None
    return tuple(sorted(os.sched_getaffinity(0)))


def plan_cores(
    allowed: Sequence[int], local_rank: int, local_world: int, threads: int
) -> CoreBinding | None:
    """The binding of local rank `local_rank` of `local_world` ranks with `threads` intra-op
    threads each, over the cores in `allowed`; None when there are fewer cores than
    ``local_world * threads`` (binding would stack ranks on a core)."""
    if local_world < 1 or threads < 1:
        raise ValueError(f"local_world={local_world} and threads={threads} must be at least 1")
    if not 0 <= local_rank < local_world:
        raise ValueError(f"local_rank={local_rank} is not in 0..{local_world - 1}")
    cores = sorted(set(allowed))
    need = local_world * threads
    if len(cores) < need:
        return None
    spare = tuple(cores[need:])
    return CoreBinding(
        rank=tuple(cores[local_rank * threads : (local_rank + 1) * threads]),
        loader=spare or tuple(cores),
        spare=bool(spare),
    )


def bind_process(cores: Iterable[int]) -> None:
    """Bind every thread of this process to `cores` (``sched_setaffinity`` binds one
    thread; threads started later inherit their starter's mask)."""
    mask = set(cores)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: this thread, which later threads inherit from
        tids = [0]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, mask)


def bind_worker(cores: tuple[int, ...], worker_id: int) -> None:
    """A DataLoader ``worker_init_fn`` (with ``functools.partial``): the worker, forked
    from a bound rank, leaves the rank's cores for `cores`."""
    del worker_id  # every worker of a rank shares the same cores
    bind_process(cores)


def bind_rank(
    threads: int, environ: Mapping[str, str] | None = None
) -> tuple[CoreBinding | None, str]:
    """Bind this rank's process (local rank ``LOCAL_RANK`` of ``LOCAL_WORLD_SIZE``, which
    every kiln launcher and torchrun set) to its cores; returns the binding (None when it
    could not bind) and a line saying what was done, for the run's log."""
    env = os.environ if environ is None else environ
    allowed = allowed_cores()
    if allowed is None:
        return None, "bind_cores: this platform cannot bind a process to cores; not binding"
    try:
        local_rank, local_world = int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return None, (
            "bind_cores: the launcher set no LOCAL_RANK / LOCAL_WORLD_SIZE (under srun, "
            "bind with srun --cpu-bind); not binding"
        )
    binding = plan_cores(allowed, local_rank, local_world, threads)
    if binding is None:
        return None, (
            f"bind_cores: {local_world} local rank(s) x {threads} thread(s) need "
            f"{local_world * threads} cores and this process may use {len(allowed)} "
            f"({_cores(allowed)}); not binding"
        )
    bind_process(binding.rank)
    ranks = "; ".join(
        _cores(plan.rank)
        for plan in (plan_cores(allowed, r, local_world, threads) for r in range(local_world))
        if plan is not None
    )
    left = "" if binding.spare else " (no core left over: all of them)"
    return binding, (
        f"bind_cores: {local_world} local rank(s) on {ranks}, "
        f"their loader workers on {_cores(binding.loader)}{left}"
    )


def loader_in_rank(
    mode: str,
    num_workers: int,
    threads: int,
    environ: Mapping[str, str] | None = None,
    cores: int | None = None,
    *,
    cpu_ranks: bool = True,
) -> tuple[bool, str | None]:
    """Whether this rank runs its loader workers in its own process (``data.worker_processes``
    `mode`: 'always' processes, 'never', or 'auto': in the rank when the ranks compute on
    the CPU (`cpu_ranks`; a GPU rank's threads mostly wait on the GPU, leaving the cores to
    worker processes) and its node's ``LOCAL_WORLD_SIZE`` ranks of `threads` threads fill
    the `cores` it may use, by default its affinity mask), and for 'auto' a line saying
    what it chose and why (None when it keeps processes). ``num_workers=0`` is always in
    the rank."""
    if num_workers == 0 or mode == "never":
        return True, None
    if mode == "always":
        return False, None
    if mode != "auto":
        raise ValueError(f"worker_processes={mode!r} is not one of 'auto', 'always', 'never'")
    if not cpu_ranks:
        return False, None
    env = os.environ if environ is None else environ
    try:
        local_world = int(env["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return False, None  # the node's rank count is unknown: keep the processes
    if cores is None:
        cores = usable_cpus()
    if local_world * threads < cores:
        return False, None
    return True, (
        f"loader: {num_workers} worker(s) per rank in the rank's process ({local_world} local "
        f"rank(s) x {threads} thread(s) fill the {cores} core(s); data.worker_processes: "
        "always forks them anyway)"
    )


def _cores(cores: Sequence[int]) -> str:
    """'core 3', 'cores 0-3', 'cores 0,2,5': a set of cores as a person writes it."""
    cores = sorted(cores)
    if len(cores) == 1:
        return f"core {cores[0]}"
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"cores {cores[0]}-{cores[-1]}"
    return "cores " + ",".join(map(str, cores))
