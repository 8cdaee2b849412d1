"""`resources.bind_cores`: the core plan, binding a whole process, the loader's workers."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

from kiln.resource_fit import usable_cpus
from kiln.training.cpu_binding import (
    CoreBinding,
    allowed_cores,
    bind_process,
    bind_rank,
    loader_in_rank,
    plan_cores,
)
from kiln.training.data import WebDatasetLoader
from tests.helpers_datasets import write_tiny_dataset

pytestmark = pytest.mark.skipif(allowed_cores() is None, reason="no sched_setaffinity here")


def test_each_rank_gets_its_own_cores_and_the_loader_the_rest() -> None:
    assert plan_cores([0, 1, 2, 3], 0, 1, 1) == CoreBinding((0,), (1, 2, 3), True)
    assert plan_cores([0, 1, 2, 3], 1, 2, 1) == CoreBinding((1,), (2, 3), True)
    assert plan_cores(range(8), 1, 2, 3) == CoreBinding((3, 4, 5), (6, 7), True)
    # the cores this process may use, in order, whatever their numbers
    assert plan_cores([9, 4, 6, 2], 1, 2, 1) == CoreBinding((4,), (6, 9), True)


def test_with_no_core_left_over_the_loader_may_use_all_of_them() -> None:
    assert plan_cores([0, 1], 0, 2, 1) == CoreBinding((0,), (0, 1), False)
    assert plan_cores([0, 1, 2, 3], 1, 2, 2) == CoreBinding((2, 3), (0, 1, 2, 3), False)


def test_too_few_cores_binds_nothing() -> None:
    assert plan_cores([0, 1], 0, 3, 1) is None
    assert plan_cores([0, 1, 2], 0, 2, 2) is None


def test_a_rank_outside_the_local_world_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"local_rank=2 is not in 0\.\.1"):
        plan_cores([0, 1], 2, 2, 1)
    with pytest.raises(ValueError, match="threads=0"):
        plan_cores([0, 1], 0, 1, 0)


def _threads_affinity(out: Any, cores: tuple[int, ...]) -> None:
    """In a child: start a thread, bind the process, report every thread's mask."""
    started, stop = threading.Event(), threading.Event()

    def idle() -> None:
        started.set()
        stop.wait()

    t = threading.Thread(target=idle)
    t.start()
    started.wait()
    bind_process(cores)
    late = threading.Thread(target=lambda: out.put(("late", sorted(os.sched_getaffinity(0)))))
    late.start()  # a thread started after binding inherits the mask
    late.join()
    for tid in os.listdir("/proc/self/task"):
        try:
            mask = sorted(os.sched_getaffinity(int(tid)))
        except ProcessLookupError:  # a thread that ended since the listing (the late one)
            continue
        out.put((tid, mask))
    stop.set()
    t.join()
    out.put(None)


def test_binding_a_process_binds_every_thread_it_has_and_starts() -> None:
    core = allowed_cores()[-1]  # type: ignore[index]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_threads_affinity, args=(out, (core,)))
    child.start()
    masks = list(iter(lambda: out.get(timeout=60), None))  # a dead child fails, not hangs
    child.join(30)
    assert child.exitcode == 0
    assert len(masks) >= 3  # the main thread, the idle thread, the late one
    assert all(mask == [core] for _, mask in masks), masks


def _bind_rank_in_child(out: Any, threads: int, env: dict[str, str]) -> None:
    binding, line = bind_rank(threads, env)
    out.put((binding, line, sorted(os.sched_getaffinity(0))))


def _bind_rank(threads: int, env: dict[str, str]) -> tuple[CoreBinding | None, str, list[int]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_bind_rank_in_child, args=(out, threads, env))
    child.start()
    result = out.get(timeout=60)
    child.join(30)
    return result  # type: ignore[no-any-return]


def test_bind_rank_binds_its_process_and_says_where() -> None:
    allowed = list(allowed_cores() or ())
    binding, line, mask = _bind_rank(1, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    assert binding is not None and mask == [allowed[0]] == list(binding.rank)
    assert line.startswith(f"bind_cores: 1 local rank(s) on core {allowed[0]}, ")
    if len(allowed) == 1:
        assert line.endswith("(no core left over: all of them)")


def test_bind_rank_says_why_it_does_not_bind() -> None:
    allowed = list(allowed_cores() or ())
    too_many = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(len(allowed) + 1)}
    binding, line, mask = _bind_rank(1, too_many)
    assert binding is None and mask == allowed
    assert f"need {len(allowed) + 1} cores and this process may use {len(allowed)}" in line
    binding, line, mask = _bind_rank(1, {"LOCAL_RANK": "0"})  # srun sets no LOCAL_WORLD_SIZE
    assert binding is None and mask == allowed
    assert "no LOCAL_RANK / LOCAL_WORLD_SIZE" in line and "--cpu-bind" in line


def test_loader_workers_run_on_their_cores_and_read_the_same_batches(tmp_path: Path) -> None:
    dataset = str(write_tiny_dataset(tmp_path / "ds", num_samples=32))
    core = allowed_cores()[-1]  # type: ignore[index]

    def loader(**kw: Any) -> WebDatasetLoader:
        return WebDatasetLoader(
            dataset, batch_size=4, seed=3, num_workers=1, image_size=16, context_length=24, **kw
        )

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    it = iter(loader(worker_cpus=(core,)))
    try:
        bound = list(itertools.islice(it, 5))
        workers = [p for p in me.children(recursive=True) if p.pid not in before]
        assert workers, "the loader started no worker process"
        assert all(p.cpu_affinity() == [core] for p in workers)
    finally:
        it.close()  # type: ignore[attr-defined]
    assert sorted(os.sched_getaffinity(0)) == list(allowed_cores() or ())  # this one unbound
    it = iter(loader())
    try:
        free = list(itertools.islice(it, 5))
    finally:
        it.close()  # type: ignore[attr-defined]
    assert [b.uids for b in bound] == [b.uids for b in free]
    assert all((a.images == b.images).all() for a, b in zip(bound, free, strict=True))


def test_auto_runs_the_loader_in_the_rank_when_the_ranks_fill_the_cores() -> None:
    two = {"LOCAL_WORLD_SIZE": "2"}
    in_rank, line = loader_in_rank("auto", 1, 1, two, cores=2)
    assert in_rank and line == (
        "loader: 1 worker(s) per rank in the rank's process (2 local rank(s) x 1 thread(s) "
        "fill the 2 core(s); data.worker_processes: always forks them anyway)"
    )
    assert loader_in_rank("auto", 2, 2, two, cores=3)[0]  # 4 threads on 3 cores
    assert loader_in_rank("auto", 1, 1, {"LOCAL_WORLD_SIZE": "1"}, cores=2) == (False, None)
    assert loader_in_rank("auto", 1, 1, {}, cores=1) == (False, None)  # rank count unknown
    # GPU ranks leave the cores to worker processes, however many threads they have
    assert loader_in_rank("auto", 4, 8, {"LOCAL_WORLD_SIZE": "8"}, cores=64, cpu_ranks=False) == (
        False,
        None,
    )
    mine = usable_cpus()  # by default the cores this process may use
    assert loader_in_rank("auto", 1, 1, {"LOCAL_WORLD_SIZE": str(mine)})[0]
    assert not loader_in_rank("auto", 1, 1, {"LOCAL_WORLD_SIZE": "1"})[0] or mine == 1


def test_worker_processes_always_and_never_and_zero_workers_decide_alone() -> None:
    two = {"LOCAL_WORLD_SIZE": "2"}
    assert loader_in_rank("always", 1, 1, two, cores=2) == (False, None)
    assert loader_in_rank("never", 3, 1, {"LOCAL_WORLD_SIZE": "1"}, cores=64) == (True, None)
    assert loader_in_rank("always", 0, 1, two, cores=2) == (True, None)  # 0: in the rank
    with pytest.raises(ValueError, match="'auto', 'always', 'never'"):
        loader_in_rank("sometimes", 1, 1, two, cores=2)


def test_a_loader_in_the_rank_starts_no_process_and_reads_the_same_batches(
    tmp_path: Path,
) -> None:
    dataset = str(write_tiny_dataset(tmp_path / "ds", num_samples=32))

    def batches(**kw: Any) -> list[Any]:
        it = iter(
            WebDatasetLoader(
                dataset, batch_size=4, seed=3, num_workers=2, image_size=16, context_length=24,
                **kw,
            )
        )  # fmt: skip
        try:
            return list(itertools.islice(it, 6))
        finally:
            it.close()  # type: ignore[attr-defined]

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    inline = batches(in_rank=True)
    assert {p.pid for p in me.children(recursive=True)} <= before
    forked = batches()
    assert [b.uids for b in inline] == [b.uids for b in forked]
    assert all((a.images == b.images).all() for a, b in zip(inline, forked, strict=True))
