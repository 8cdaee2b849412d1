"""Where a curation step's tasks run: a process pool on this machine, or Ray tasks.

Both run the same task function on the same items and skip the tasks whose completion
marker already holds this step's fingerprint, so the outputs (and a resumed run's) are the
same bytes whichever runs them. They differ in what they cost and reach:

- `LocalExecutor`: worker processes forked from the driver, kept across phases. No Ray
  to start (Ray's own processes cost ~8 CPU-seconds and ~1 GB before the first task), no
  module imports per worker, and a stage's `setup` (a 500k-entry matcher) is built once in
  the driver and shared copy-on-write instead of once per worker. A worker that dies
  (SIGKILL, out of memory) has its tasks rerun on a fresh pool, up to `_RETRIES` times.
  CPU stages only; one machine.
- `RayExecutor`: Ray tasks (or an actor pool, for stages that ask for one), on the
  embedded Ray or a cluster; GPUs; retries by Ray.

`choose_executor` picks between them for `execution.executor: auto`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from kiln import storage
from kiln.data_curation.stage import StageResources
from kiln.liveness import die_with_parent
from kiln.resource_fit import ResourceFitError, WaitTimeout, ray_capacity, stage_fit_problem

__all__ = [
    "ACTOR_START_TIMEOUT_S",
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "TaskJob",
    "choose_executor",
    "ray_is_running",
]

logger = logging.getLogger("kiln.curation")

_PROGRESS_EVERY_S = 10.0
#: How long an actor pool may take to start before the step fails (a cluster busy with
#: other jobs, or one that lost a node; impossible pools are refused before this).
ACTOR_START_TIMEOUT_S = 600.0
_RETRIES = 3
_CONTEXT_PHASES = ("apply", "fit", "partition", "group", "join")
_SHARE_SETUP_S = 0.2  # a stage setup this slow is built once and shared by forking again

TaskFn = Callable[[str, Any, int, dict[str, Any]], dict[str, Any]]


class TaskJob(Protocol):
    """What an executor needs of a step's job: its name, fingerprint, markers, context."""

    @property
    def step(self) -> str: ...

    @property
    def stage(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    def marker(self, phase: str, index: int) -> str: ...

    def context(self) -> Any: ...


def ray_is_running() -> bool:
    """True when this process is connected to a Ray (without importing Ray to find out)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


class Executor:
    """Runs a phase's tasks, skipping those already finished; reports progress."""

    kind = ""
    cpus: float = 1.0

    def __init__(self, fn: TaskFn) -> None:
        self.fn = fn

    def run(
        self,
        phase: str,
        job: TaskJob,
        items: list[dict[str, Any]],
        *,
        resources: StageResources | None = None,
        label: str = "",
    ) -> tuple[list[dict[str, Any]], int]:
        """Results of every task (from its marker when it already finished), and how many
        were reused."""
        res = resources or StageResources()
        results: dict[int, dict[str, Any]] = {}
        todo = []
        for i in range(len(items)):
            marker = storage.read_json(job.marker(phase, i))
            if isinstance(marker, dict) and marker.get("fingerprint") == job.fingerprint:
                results[i] = marker["result"]
            else:
                todo.append(i)
        reused = len(results)
        if todo:
            self.check_resources(job.step, res)
            start = last = time.perf_counter()
            for done in self.execute(phase, job, items, todo, res):
                if done is not None:
                    results[done[0]] = done[1]
                now = time.perf_counter()
                if now - last >= _PROGRESS_EVERY_S:
                    last = now
                    logger.info(
                        "step %s%s: %d/%d tasks done (%.0fs)",
                        job.step,
                        f" ({label})" if label else "",
                        len(results),
                        len(items),
                        now - start,
                    )
        return [results[i] for i in range(len(items))], reused

    def check_plan(self, steps: Iterable[tuple[str, StageResources]]) -> None:
        """`check_resources` for every (step name, resources) of a plan: before any work."""
        for step, res in steps:
            self.check_resources(step, res)

    def check_resources(self, step: str, res: StageResources) -> None:
        """Refuse (with the fix) a task that could never be scheduled, instead of hanging."""
        if res.num_cpus > self.cpus:
            raise ResourceFitError(
                f"step {step}: a task needs {res.num_cpus:g} CPUs but {self.where()} has "
                f"{self.cpus:g}: lower the stage's resources.num_cpus"
            )

    def where(self) -> str:
        return "this executor"

    def close(self) -> None:
        """Release the workers (the end of a run)."""

    def execute(
        self,
        phase: str,
        job: TaskJob,
        items: list[dict[str, Any]],
        todo: list[int],
        res: StageResources,
    ) -> Iterator[tuple[int, dict[str, Any]] | None]:
        """(index, result) per finished task, or None every few seconds while waiting."""
        raise NotImplementedError


# --------------------------------------------------------------------------- local


def _worker_start(driver: int | None, environ: dict[str, str] | None = None) -> None:
    """Pool worker start: exit when the parent dies (a SIGKILLed `kiln curate` must not
    leave its workers behind, waiting forever on a queue the siblings keep open). The
    parent is the driver (`driver`, fork) or the forkserver, which exits with the driver.

    `environ`: the driver's environment when the pool started. A forkserver keeps the
    environment of the moment it started (once per process), so without it a worker of a
    long-lived process (the Python API, `kiln experiment`) would miss what was set since:
    storage credentials such as AWS_ENDPOINT_URL, kiln's own settings."""
    if environ is not None and environ != dict(os.environ):
        os.environ.clear()
        os.environ.update(environ)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    parent = os.getppid()
    die_with_parent(driver)

    def watch() -> None:  # for systems without PR_SET_PDEATHSIG
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _fork_unsafe_threads() -> list[threading.Thread]:
    """This process's threads but those marked ``kiln_fork_safe`` (a job's heartbeat, which
    holds no lock a forked worker could need)."""
    return [t for t in threading.enumerate() if not getattr(t, "kiln_fork_safe", False)]


def _call(fn: TaskFn, cpus: int, phase: str, job: Any, index: int, item: dict[str, Any]) -> Any:
    """A task in a pool worker, with Arrow's thread pool sized to the task's CPUs (so N
    workers use N cores, not N x all of them)."""
    import pyarrow as pa

    pa.set_cpu_count(cpus)
    return fn(phase, job, index, item)


class LocalExecutor(Executor):
    """A pool of `workers` processes on this machine, kept across phases.

    The pool is forked again only after the driver built a stage context that took a
    while (`_SHARE_SETUP_S`): the workers then inherit it instead of each building its own.
    `close` ends the pool."""

    kind = "local"

    def __init__(self, fn: TaskFn, workers: int, *, start_method: str | None = None) -> None:
        super().__init__(fn)
        if workers < 1:
            raise ValueError(f"execution.workers={workers}: must be at least 1")
        self.workers = workers
        self.cpus = float(workers)
        self.start_method = start_method  # None: fork when it is safe, else forkserver
        self._pool: ProcessPoolExecutor | None = None

    def where(self) -> str:
        return "the local executor (execution.workers)"

    def check_resources(self, step: str, res: StageResources) -> None:
        if res.num_gpus:
            raise ResourceFitError(
                f"step {step}: its stage asks for {res.num_gpus:g} GPUs, which only the "
                "Ray executor schedules: set execution.executor: ray (or auto)"
            )
        super().check_resources(step, res)

    def close(self) -> None:
        self._drop_pool(kill=False)

    def _mp(self) -> multiprocessing.context.BaseContext:
        # fork shares the driver's imports and warmed stage contexts; it is unsafe once
        # other threads run here (a Ray client, a test runner's helpers): then forkserver.
        # Decided once, before the pool's own manager thread exists.
        if self.start_method is None:
            unsafe = ray_is_running() or len(_fork_unsafe_threads()) > 1
            self.start_method = "forkserver" if unsafe else "fork"
        if self.start_method == "forkserver":
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["kiln.data_curation.runner"])
            return ctx
        return multiprocessing.get_context("fork")

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            mp = self._mp()
            fork = mp.get_start_method() == "fork"
            if fork:
                # the driver's objects (a stage context: a matcher's 500k entries) out of the
                # workers' garbage collections, which would copy every page they touch
                gc.freeze()
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=mp,
                initializer=_worker_start,
                initargs=(os.getpid() if fork else None, None if fork else dict(os.environ)),
            )
        return self._pool

    def _drop_pool(self, *, kill: bool) -> None:
        if self._pool is not None:
            if kill:
                _kill(self._pool)
            else:
                self._pool.shutdown(wait=True)
            self._pool = None
            gc.unfreeze()

    def execute(
        self,
        phase: str,
        job: TaskJob,
        items: list[dict[str, Any]],
        todo: list[int],
        res: StageResources,
    ) -> Iterator[tuple[int, dict[str, Any]] | None]:
        slots = max(1, int(self.cpus // max(res.num_cpus, 1e-9)))
        if res.actors:
            slots = min(slots, res.actors)
        cpus = max(1, int(res.num_cpus))
        if job.stage and phase in _CONTEXT_PHASES and self._mp().get_start_method() == "fork":
            start = time.process_time()
            job.context()  # built here once: the workers forked after this inherit it
            if time.process_time() - start > _SHARE_SETUP_S:
                self._drop_pool(kill=False)
        deaths = dict.fromkeys(todo, 0)
        queue = list(todo)
        while queue:
            pool = self._get_pool()
            broken: list[int] = []  # running when a worker died
            requeue: list[int] = []  # not started yet then
            futures: dict[Future[dict[str, Any]], int] = {}
            waiting = list(queue)
            try:
                while waiting or futures:
                    while waiting and len(futures) < slots:
                        i = waiting.pop(0)
                        futures[pool.submit(_call, self.fn, cpus, phase, job, i, items[i])] = i
                    done, _ = wait(list(futures), _PROGRESS_EVERY_S, FIRST_COMPLETED)
                    if not done:
                        yield None
                    for f in sorted(done, key=lambda f: futures[f]):
                        i = futures.pop(f)
                        try:
                            result = f.result()
                        except BrokenProcessPool:
                            broken.append(i)
                            continue
                        yield i, result
                    if broken:  # the pool is gone: what it held goes to a fresh one
                        broken += list(futures.values())
                        requeue += waiting
                        waiting, futures = [], {}
            except BaseException:
                self._drop_pool(kill=True)
                raise
            if broken:
                self._drop_pool(kill=True)
                for i in broken:
                    deaths[i] += 1
                    if deaths[i] > _RETRIES:
                        raise RuntimeError(
                            f"step {job.step}: task {phase}-{i} lost its worker process "
                            f"{deaths[i]} times (killed, or out of memory?): lower "
                            "execution.rows_per_task or execution.workers, and rerun to resume"
                        )
                logger.warning(
                    "step %s: a worker process died; rerunning %d unfinished tasks",
                    job.step,
                    len(broken),
                )
            queue = sorted(broken + requeue)


def _kill(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now (a task failed or the driver was interrupted): its workers would
    otherwise finish every queued task first."""
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        with contextlib.suppress(Exception):
            p.kill()
    for p in processes:
        with contextlib.suppress(Exception):
            p.join(timeout=5)


# --------------------------------------------------------------------------- Ray


class _StageWorker:
    """A pool actor: runs tasks one at a time, keeping the stage's context between them."""

    def __init__(self, fn: TaskFn) -> None:
        self.fn = fn

    def run(self, phase: str, job: Any, index: int, item: dict[str, Any]) -> dict[str, Any]:
        return self.fn(phase, job, index, item)


class RayExecutor(Executor):
    """Ray tasks on the Ray this process is connected to (embedded or a cluster)."""

    kind = "ray"

    def __init__(self, fn: TaskFn) -> None:
        import ray

        super().__init__(fn)
        if not ray.is_initialized():
            raise RuntimeError(
                "Ray is not initialised: call kiln.platform.ray_cluster.start_ray() (or "
                "ray.init(...)) first, or set execution.executor: local"
            )
        self._remote = ray.remote(fn)
        self.capacity = ray_capacity()
        self.cpus = max(1.0, self.capacity.cpus)

    def where(self) -> str:
        return self.capacity.where

    def check_resources(self, step: str, res: StageResources) -> None:
        problem = stage_fit_problem(step, res, self.capacity)
        if problem:
            raise ResourceFitError(problem)

    def execute(
        self,
        phase: str,
        job: TaskJob,
        items: list[dict[str, Any]],
        todo: list[int],
        res: StageResources,
    ) -> Iterator[tuple[int, dict[str, Any]] | None]:
        import ray

        window = max(1, int(self.cpus // res.num_cpus)) * 2
        options: dict[str, Any] = {"num_cpus": res.num_cpus}
        if res.num_gpus:
            options["num_gpus"] = res.num_gpus
        pool: list[Any] = []
        if res.actors:
            # Restarted after a crash; the call is retried on the new actor.
            worker = ray.remote(_StageWorker).options(
                **options, max_restarts=_RETRIES, max_task_retries=_RETRIES
            )
            pool = [worker.remote(self.fn) for _ in range(res.actors)]
            _wait_started(job.step, pool, res)
            window = 2 * res.actors
        remote = self._remote.options(**options, max_retries=_RETRIES)
        pending: dict[Any, int] = {}
        queue = list(todo)
        try:
            while queue or pending:
                while queue and len(pending) < window:
                    i = queue.pop(0)
                    call = (
                        pool[i % len(pool)].run.remote(phase, job, i, items[i])
                        if pool
                        else remote.remote(phase, job, i, items[i])
                    )
                    pending[call] = i
                done, _ = ray.wait(list(pending), num_returns=1, timeout=_PROGRESS_EVERY_S)
                if not done:
                    yield None
                for ref in done:
                    i = pending.pop(ref)
                    yield i, ray.get(ref)
        finally:
            for actor in pool:
                ray.kill(actor)


def _wait_started(step: str, pool: list[Any], res: StageResources) -> None:
    """Wait for every actor of a pool to start, saying so every `_PROGRESS_EVERY_S`;
    `WaitTimeout` after `ACTOR_START_TIMEOUT_S` (resources taken by another job, a
    node lost) instead of sending tasks to actors that never run them."""
    import ray

    pending = [actor.__ray_ready__.remote() for actor in pool]
    started = time.perf_counter()
    while True:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=_PROGRESS_EVERY_S)
        ray.get(done)  # an actor whose constructor failed raises here
        waited = time.perf_counter() - started
        if not pending:
            return
        if waited >= ACTOR_START_TIMEOUT_S:
            raise WaitTimeout(
                f"step {step}: {len(pool) - len(pending)} of {len(pool)} actors "
                f"({res.num_cpus:g} CPUs, {res.num_gpus:g} GPUs each) started in "
                f"{waited:.0f}s: the Ray cluster has no room for the others (another job "
                "holds its CPUs, or a node left); check `ray status`, lower the stage's "
                "resources.actors, and rerun to resume"
            )
        logger.info(
            "step %s: waiting for %d of %d actors to start (%.0fs; Ray needs %g free CPUs "
            "for each)",
            step,
            len(pending),
            len(pool),
            waited,
            res.num_cpus,
        )


def choose_executor(
    executor: str, *, address: str | None, needs_gpus: bool, in_ray: bool | None = None
) -> str:
    """`local` or `ray` for an `execution.executor` setting: `auto` is Ray when a cluster
    address is given, this process is already connected to a Ray (`in_ray`; default: look),
    or a stage needs GPUs; otherwise the local pool (one machine, nothing to start)."""
    if executor != "auto":
        return executor
    if in_ray is None:
        in_ray = ray_is_running()
    return "ray" if address or needs_gpus or in_ray else "local"
