"""Start the training ranks: local subprocesses or Ray Train workers.

`train()` is the one entry point (the CLI and the Python API call it). Both launchers run
`kiln.training.loop.train_worker` in every rank with the same arguments and pin the same
number of intra-op threads per rank, so for the same config and world size they produce the
same losses.

- ``launcher="local"``: ``num_workers`` processes of ``python -m kiln.training.launch``
  on this machine (CPU ranks forked from a warm `kiln.training.rank_fork` server, which
  has imported torch), each in its own session (process group) so the parent can stop a rank
  together with its DataLoader workers; rank 0's log is echoed to stdout; per-rank logs go
  to ``{run_dir}/logs/``. If any rank fails, the others are stopped; with restarts left
  (``max_restarts``) every rank is started again from the latest complete checkpoint,
  otherwise `TrainLaunchError` carries the exit codes and the failing rank's log tail.
- ``launcher="ray"``: a Ray Train ``TorchTrainer`` on the Ray cluster the caller connected
  to (``ray.init`` first; ``kiln.platform`` does it), on one node or several (``placement``).
  Ray Train makes the process group and sets RANK/LOCAL_RANK/MASTER_ADDR...; DeepSpeed
  reuses that group. A dead worker makes Ray Train restart the whole group (up to
  ``max_restarts`` times, its ``FailureConfig.max_failures``); each attempt resumes from
  the latest complete checkpoint, and records where its ranks ran in
  ``{run_dir}/ray_train/{name}/kiln_attempts.jsonl``. Every rank trains into the driver's
  run dir (a staged one's staging folder), so workers on other nodes must mount it: a
  group with a rank that cannot see it stops before training (`_run_dir_unseen`).
- ``launcher="torchrun"``: this process is one rank of a world started by torchrun or srun
  (`kiln.training.torchrun`); a requeued Slurm job resumes from the latest checkpoint.

A restarted attempt resumes when the run dir holds a complete checkpoint: `train` refused a
fresh run on top of existing checkpoints, so one that appears later was written by an
earlier attempt of this launch. Every rank looks before any collective, while no rank of
the failed attempt is alive to write, so all ranks agree.

DeepSpeed's CPU comm op is built (or loaded from its cache) once in the launching process
before any rank starts, so ranks never race to compile it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from kiln import storage
from kiln.console import KILN_PREFIX, kiln_stream, library_output_to, say, verbose
from kiln.environ import scoped_env
from kiln.liveness import die_with_parent, identity, watch
from kiln.resource_fit import RAY_START_TIMEOUT_S, WaitTimeout, check_train_fits, ray_capacity
from kiln.training import rank_fork
from kiln.training.checkpoint import latest_checkpoint
from kiln.training.config import Launcher, Placement, TrainConfig
from kiln.training.engine import prebuild_comm_ops, prebuild_offload_ops, set_runtime_env
from kiln.training.host_memory import process_env
from kiln.training.loop import SUMMARY_FILE, _log
from kiln.training.preflight import preflight
from kiln.training.rank_fork import RankProcess
from kiln.training.remote_run import RUN_URL_ENV
from kiln.training.torchrun import rank_env, run_rank

__all__ = [
    "ATTEMPTS_FILE",
    "CONFIG_FILE",
    "TrainLaunchError",
    "TrainSummary",
    "free_port",
    "main",
    "train",
]

CONFIG_FILE = "train_config.json"
ATTEMPTS_FILE = "kiln_attempts.jsonl"
_LOG_TAIL_BYTES = 6000
_FAULT_PREFIX = "KILN_FAULT_"
_SAY_STARTING_AFTER_S = 10.0  # the first line while Ray Train starts a group, then every:
_SAY_WAITING_EVERY_S = 30.0
_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train's, 60 s


class TrainSummary(BaseModel):
    """What one `train()` invocation did."""

    run_dir: str
    launcher: Launcher
    world_size: int
    first_step: int = Field(description="first step trained by this invocation")
    last_step: int = Field(description="step reached (== max_steps when finished)")
    losses: list[float] = Field(description="global loss of each step this invocation ran")
    samples_per_s: float
    latest_checkpoint: str | None
    resumed_from: int | None = Field(description="checkpoint step resumed from, if any")
    wall_s: float = Field(description="seconds the launch took, start-up included")
    restarts: int = Field(
        default=0,
        description="times the ranks were started again in this launch (after a failure; "
        "launcher torchrun: a requeued Slurm job)",
    )
    nodes: list[str] = Field(
        default_factory=list,
        description="Ray node id of each rank's worker in the last attempt (launcher ray)",
    )
    rank: int = Field(
        default=0, description="rank of the process it describes (launcher torchrun: this one)"
    )
    eval: dict[str, Any] | None = Field(
        default=None, description="the end-of-training evaluation, when the run made one"
    )


class TrainLaunchError(RuntimeError):
    """A rank (or the Ray Train run) failed; `exit_codes` maps rank -> exit status.

    The message holds the details (a rank's log tail, Ray's traceback); `headline` says what
    failed in one line and `log` names the file with the whole story, for the CLI to print
    instead of the details.
    """

    def __init__(
        self,
        message: str,
        exit_codes: dict[int, int | None] | None = None,
        *,
        headline: str | None = None,
        log: Path | None = None,
    ) -> None:
        super().__init__(message)
        self.exit_codes = exit_codes or {}
        self.headline = headline or message.splitlines()[0]
        self.log = log


_ERROR_LINE = re.compile(r"^\s*((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit)\b.*)$")


def last_error_line(text: str) -> str | None:
    """The last `SomeError: message` line of a traceback or log tail, if it has one."""
    found = None
    for line in text.splitlines():
        match = _ERROR_LINE.match(line)
        if match:
            found = match.group(1).strip()
    return found


def _threads(cpus_per_worker: float) -> int:
    return max(1, int(cpus_per_worker))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_summary(
    run: Path,
    launcher: Launcher,
    started: float,
    restarts: int = 0,
    nodes: list[str] | None = None,
    rank: int = 0,
) -> TrainSummary:
    path = run / SUMMARY_FILE
    if not path.is_file():
        raise TrainLaunchError(f"training finished but wrote no {path}: see the logs in {run}")
    data = json.loads(path.read_text())
    return TrainSummary(
        run_dir=str(run),
        launcher=launcher,
        world_size=data["world_size"],
        first_step=data["first_step"],
        last_step=data["last_step"],
        losses=data["losses"],
        samples_per_s=data["samples_per_s"],
        latest_checkpoint=data["latest_checkpoint"],
        resumed_from=data["resumed_from"],
        wall_s=time.perf_counter() - started,
        restarts=restarts,
        nodes=nodes or [],
        rank=rank,
    )


def train(
    cfg: TrainConfig,
    run_dir: str,
    *,
    num_workers: int = 2,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    launcher: Launcher = "ray",
    resume: bool = False,
    recipe_hash: str = "",
    max_restarts: int = 0,
    placement: Placement = "pack",
    checked: bool = False,
    start_timeout_s: float = RAY_START_TIMEOUT_S,
    bind_cores: bool = False,
) -> TrainSummary:
    """Train `cfg` on `num_workers` ranks into `run_dir` (resume: from its latest complete
    checkpoint). Returns when every rank is done; raises `TrainLaunchError` if one fails
    and `max_restarts` restarts from the latest complete checkpoint did not help.

    `placement` (Ray only) is Ray Train's placement strategy for the workers, e.g.
    ``strict_spread`` for one worker per node. With ``launcher="torchrun"`` this process
    is one rank and torchrun / srun set the world size (`num_workers` is not used).
    `checked`: the caller already ran `kiln.training.preflight.preflight` for this launch
    (`kiln train` does, before it starts Ray), so it is not run twice. `bind_cores`: each
    local rank computes on cores of its own, its loader workers on the cores left over
    (`kiln.training.cpu_binding`; for a machine the run has to itself).

    Ray: workers that can never all be placed (more CPUs than the cluster has, a worker
    bigger than any node) are refused before Ray Train starts (`ResourceFitError`); a
    group that does not start within `start_timeout_s` (resources held by another job, a
    node lost) ends the run with `WaitTimeout`. While a group starts, a line says what it
    waits for (the cluster's resources, or the workers' processes) after 10 s, then every 30 s.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers} must be at least 1")
    if launcher not in ("ray", "local", "torchrun"):
        raise ValueError(f"launcher={launcher!r} is not one of 'ray', 'local', 'torchrun'")
    if max_restarts < 0:
        raise ValueError(f"max_restarts={max_restarts} must be 0 or more")
    if placement != "pack" and launcher != "ray":
        raise ValueError(f"placement={placement!r} places Ray Train workers: use launcher='ray'")
    if launcher == "local" and gpus_per_worker > 0 and not torch.cuda.is_available():
        raise ValueError(
            f"gpus_per_worker={gpus_per_worker} but this machine has no CUDA GPU: set "
            "resources.gpus_per_worker=0 to train on CPU"
        )
    ranks = rank_env() if launcher == "torchrun" else None
    if ranks is not None and max_restarts:
        raise ValueError(
            "max_restarts needs launcher 'ray' or 'local': torchrun / srun start ranks"
        )
    world = ranks.world_size if ranks is not None else num_workers
    if storage.is_remote(run_dir):
        raise ValueError(
            f"run_dir {run_dir!r} is a URL: train it with kiln.train / `kiln train`, which "
            "stage it in a local folder and copy the checkpoints up (kiln.training.remote_run)"
        )
    run = Path(run_dir).resolve()
    if not checked:  # under torchrun, `run_rank` checks the run dir once it knows of restarts
        # (and one process per node hashes the shards)
        verify = ranks is None or ranks.local_rank == 0
        preflight(cfg, world, run, resume, run_dir_check=ranks is None, verify=verify)
    run.mkdir(parents=True, exist_ok=True)
    if ranks is None or ranks.local_rank == 0:  # (a staged run: each node's own copy)
        (run / SUMMARY_FILE).unlink(missing_ok=True)
    started = time.perf_counter()
    set_runtime_env()
    prebuild_comm_ops()
    prebuild_offload_ops(cfg)
    threads = _threads(cpus_per_worker)
    if ranks is not None:
        # torchrun prints every rank's output: the libraries' goes to this rank's log file
        with library_output_to(run / "logs" / f"torchrun-rank{ranks.rank}.log"):
            restarts = run_rank(
                cfg,
                run,
                ranks,
                num_threads=threads,
                resume=resume,
                recipe_hash=recipe_hash,
                bind_cores=bind_cores,
            )
        return _read_summary(run, launcher, started, restarts=restarts, rank=ranks.rank)
    if launcher == "local":
        say(
            f"starting {world} local rank(s), {threads} thread(s) each (their logs: "
            f"{run / 'logs'}/trainNNN-rankR.log)"
        )
        restarts = _launch_local(
            cfg, run, world, threads, gpus_per_worker, resume, recipe_hash, max_restarts, bind_cores
        )
        return _read_summary(run, launcher, started, restarts=restarts)
    say(f"starting {world} Ray Train worker(s), {cpus_per_worker:g} CPU each")
    attempts = _launch_ray(
        cfg,
        run,
        world,
        cpus_per_worker,
        gpus_per_worker,
        resume,
        recipe_hash,
        max_restarts,
        placement,
        start_timeout_s,
        bind_cores,
    )
    nodes = [str(w["node_id"]) for w in attempts[-1]["workers"]] if attempts else []
    return _read_summary(run, launcher, started, max(0, len(attempts) - 1), nodes)


# --------------------------------------------------------------------------- local launcher


def _log_path(logs: Path, rank: int) -> Path:
    n = 1
    while (logs / f"train{n:03d}-rank0.log").exists():
        n += 1
    return logs / f"train{n:03d}-rank{rank}.log"


def _tail(path: Path, limit: int = _LOG_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class _Follower(threading.Thread):
    """Echo kiln's lines of a growing log file (every line with `kiln -v`) until stopped."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stop = threading.Event()
        self.partial = ""
        self.show_all = verbose()

    def _pump(self, f: Any, final: bool = False) -> None:
        self.partial += f.read().decode(errors="replace")
        *lines, self.partial = self.partial.split("\n")
        if final and self.partial:
            lines, self.partial = [*lines, self.partial], ""
        shown = [ln for ln in lines if self.show_all or KILN_PREFIX in ln]
        if shown:
            out = kiln_stream()
            out.write("".join(f"{ln}\n" for ln in shown))
            out.flush()

    def run(self) -> None:
        while not self.path.exists() and not self.stop.is_set():
            time.sleep(0.05)
        with contextlib.suppress(OSError), open(self.path, "rb") as f:
            while not self.stop.wait(0.2):
                self._pump(f)
            self._pump(f, final=True)


def _kill_group(proc: RankProcess, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop_all(procs: Sequence[RankProcess], grace_s: float = 10.0) -> None:
    for p in procs:
        _kill_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:  # also reaps DataLoader workers a dead rank left in its group
        _kill_group(p, signal.SIGKILL)
        p.wait()


def _launch_local(
    cfg: TrainConfig,
    run: Path,
    world: int,
    threads: int,
    gpus_per_worker: float,
    resume: bool,
    recipe_hash: str,
    max_restarts: int,
    bind_cores: bool = False,
) -> int:
    """Run the ranks to the end, restarting all of them from the latest complete checkpoint
    after a failure, up to `max_restarts` times; returns the number of restarts."""
    config_path = run / CONFIG_FILE
    config_path.write_text(cfg.model_dump_json(indent=2) + "\n")
    base_env = set_runtime_env(dict(os.environ))
    base_env.update(
        {
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "OMP_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1",
        }
    )
    base_env.pop("LOCAL_SIZE", None)  # keeps DeepSpeed's shared-memory allreduce off
    cmd = [*rank_fork.RANK_COMMAND, "--config", str(config_path)]
    cmd += ["--run-dir", str(run), "--threads", str(threads), "--recipe-hash", recipe_hash]
    cmd += ["--bind-cores"] if bind_cores else []
    restarts = 0
    while True:
        failure = _run_local_ranks(
            run, world, base_env, cmd + (["--resume"] if resume else []), fork=not gpus_per_worker
        )
        if failure is None:
            return restarts
        failed, codes, log_path = failure
        exit_codes = dict(enumerate(codes))
        if restarts >= max_restarts:
            after = f" after {restarts} restart(s)" if restarts else ""
            tail = _tail(log_path)
            cause = last_error_line(tail)
            raise TrainLaunchError(
                f"training rank {failed} exited with code {codes[failed]}{after} "
                f"(exit codes by rank: {exit_codes}); last lines of {log_path}:\n{tail}",
                exit_codes,
                headline=f"training rank {failed} exited with code {codes[failed]}{after}"
                + (f": {cause}" if cause else ""),
                log=log_path,
            )
        restarts += 1
        tag = latest_checkpoint(run)
        resume = resume or tag is not None
        _log(
            0,
            f"rank {failed} exited with code {codes[failed]} at {time.strftime('%H:%M:%S')}; "
            f"restarting from {tag or 'scratch (no complete checkpoint yet)'} "
            f"(restart {restarts} of {max_restarts})",
        )


def _run_local_ranks(
    run: Path, world: int, base_env: dict[str, str], cmd: list[str], fork: bool
) -> tuple[int, list[int | None], Path] | None:
    """One attempt: start every rank, wait for all; None when all exited 0, else (the
    first rank that failed, every rank's exit code, that rank's log) with all stopped.
    `fork`: CPU ranks, forked from a warm `kiln.training.rank_fork` server when it can."""
    logs = run / "logs"
    logs.mkdir(exist_ok=True)
    log_paths = [_log_path(logs, 0)]
    log_paths += [
        log_paths[0].with_name(log_paths[0].name.replace("rank0", f"rank{r}"))
        for r in range(1, world)
    ]
    base_env = dict(base_env, MASTER_PORT=str(free_port()))
    procs: list[RankProcess] = []
    follower = _Follower(log_paths[0])
    follower.start()
    try:
        server = rank_fork.server_for(base_env) if fork else None
        for rank in range(world):
            env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
            with open(log_paths[rank], "wb") as log:
                if server is not None:
                    try:
                        procs.append(server.spawn(cmd, env, str(log_paths[rank])))
                        continue
                    except RuntimeError as e:
                        say(f"note: {e}; starting the ranks as fresh processes")
                        server = None
                procs.append(
                    subprocess.Popen(
                        cmd,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                        preexec_fn=functools.partial(die_with_parent, os.getpid()),
                    )
                )
        failed: int | None = None
        while True:
            codes = [p.poll() for p in procs]
            failed = next((r for r, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None or all(c == 0 for c in codes):
                break
            time.sleep(0.1)
    except BaseException:
        _stop_all(procs, grace_s=2.0)
        raise
    finally:
        follower.stop.set()
        follower.join(timeout=5)
    if failed is None:
        return None
    time.sleep(0.5)  # let ranks that die of the same cause report their own codes
    codes = [p.poll() for p in procs]
    _stop_all(procs)
    return failed, codes, log_paths[failed]


# --------------------------------------------------------------------------- ray launcher


def _record_attempt(path: Path, workers: list[Any], resume_from: str | None) -> int:
    """Append this attempt (where each rank runs, what it resumes from) to the launch's
    attempts file; returns its number, 1 for the first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    attempt = len(_read_attempts(path)) + 1
    record = {
        "attempt": attempt,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resume_from": resume_from,
        "workers": workers,
    }
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return attempt


def _read_attempts(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run_dir_unseen(run: Path, workers: list[dict[str, Any]], *, staged: bool) -> str | None:
    """Why a Ray Train group cannot train into `run` (one line, naming the fix), or None.

    Every rank reads and writes the driver's run dir (rank 0 its attempts file, metrics and
    status, which the driver reads; every rank its checkpoint shards), so Ray Train
    workers on other nodes need it on storage they mount too. Without this check, those
    ranks would train into a folder of their own and the driver would wait out its start
    timeout. `workers`: each rank's `sees_run_dir` and node, gathered by every rank."""
    blind = [w for w in workers if not w["sees_run_dir"]]
    if not blind:
        return None
    ranks = ", ".join(str(w["rank"]) for w in blind)
    nodes = ", ".join(sorted({str(w["node_ip"]) for w in blind}))
    fix = (
        "a run dir on object storage is staged there: set KILN_STAGING_DIR to a folder "
        "every node mounts (the same path on each), or launch with torchrun/srun, which "
        "stages on each node"
        if staged
        else "put run_dir on a filesystem every node mounts, at the same path on each "
        "(infra/kuberay mounts one at /mnt/kiln)"
    )
    return (
        f"Ray Train rank(s) {ranks} on node(s) {nodes} cannot see the run dir {run}, "
        f"which is on the driver's node only: {fix}"
    )


def _ray_train_loop(config: dict[str, Any]) -> None:
    """Per-worker function of the Ray TorchTrainer; Ray Train calls it again on every
    worker of a restarted group."""
    set_runtime_env()
    import ray
    import ray.train
    import torch.distributed as dist

    from kiln.training.loop import train_worker

    run = Path(config["run_dir"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    # a SIGKILLed driver must not leave its ranks training until Ray notices its job is gone
    # (steps and checkpoints later): each rank on the driver's host exits when its pid is
    watch(config["driver"], f"Ray Train rank {rank} of {run}")
    tag = latest_checkpoint(run)  # before any collective: see the module docstring
    here = {
        "rank": rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
        # the launch's folder, made by the driver: proof this node sees the driver's run dir
        "sees_run_dir": Path(config["attempts_file"]).parent.is_dir(),
    }
    workers: list[Any] = [None] * ctx.get_world_size()
    dist.all_gather_object(workers, here)
    unseen = _run_dir_unseen(run, workers, staged=bool(os.environ.get(RUN_URL_ENV)))
    if unseen:  # every rank stops with the same error, before any writes
        raise RuntimeError(unseen)
    if rank == 0:
        attempt = _record_attempt(Path(config["attempts_file"]), workers, tag)
        nodes = {w["node_id"] for w in workers}
        if len(nodes) > 1:
            _log(0, f"{len(workers)} Ray Train workers on {len(nodes)} nodes")
        if attempt > 1:
            _log(
                0,
                f"Ray Train restarted the workers after a failure (restart {attempt - 1} of "
                f"{config['max_restarts']}); resuming from "
                f"{tag or 'scratch (no complete checkpoint yet)'}",
            )
    train_worker(
        TrainConfig.model_validate(config["cfg"]),
        config["run_dir"],
        resume=config["resume"] or tag is not None,
        recipe_hash=config["recipe_hash"],
        num_threads=config["num_threads"],
        bind_cores=config.get("bind_cores", False),
    )


def _launch_ray(
    cfg: TrainConfig,
    run: Path,
    world: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    resume: bool,
    recipe_hash: str,
    max_restarts: int,
    placement: Placement,
    start_timeout_s: float,
    bind_cores: bool = False,
) -> list[dict[str, Any]]:
    """Run the Ray Train group to the end; returns the attempts it took (see
    `_record_attempt`), more than one when Ray Train restarted it."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(
            "launcher='ray' needs a connected Ray: call ray.init(...) first (kiln.platform "
            "does), or use launcher='local'"
        )
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_train_fits(world, cpus_per_worker, gpus_per_worker, placement, ray_capacity())
    # Ray Train retries a group that did not start in its own timeout (60 s) forever:
    # bound the retries to about start_timeout_s (the watchdog in _fit_interruptibly says
    # what it waits for meanwhile). A start_timeout_s under Ray's group timeout shortens
    # that too, or aborting a start that timed out would wait out Ray's 60 s.
    set_timeout = os.environ.get(_GROUP_START_TIMEOUT_ENV)
    group_timeout = min(float(set_timeout or 60), max(start_timeout_s, 1.0))
    start_retries = max(1, math.ceil(start_timeout_s / group_timeout))

    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if gpus_per_worker > 0:
        resources["GPU"] = gpus_per_worker
    name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    attempts_file = run / "ray_train" / name / ATTEMPTS_FILE
    # made here, where the driver reads it: each worker looks for it (`_run_dir_unseen`)
    attempts_file.parent.mkdir(parents=True, exist_ok=True)
    # what the workers' environment must hold, even on a Ray that started before it was
    # set: fault injection, a staged run's remote URL and the allocator setting (Ray Train
    # v2's RunConfig.worker_runtime_env; passed only when there is one)
    env = {k: v for k, v in os.environ.items() if k.startswith(_FAULT_PREFIX) or k == RUN_URL_ENV}
    # Ray Train trains on a thread of its own: the allocator setting needs one arena there
    env.update(process_env(cfg.host_memory))
    worker_env: dict[str, Any] = {"worker_runtime_env": {"env_vars": env}} if env else {}
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "run_dir": str(run),
            "resume": resume,
            "recipe_hash": recipe_hash,
            "num_threads": _threads(cpus_per_worker),
            "bind_cores": bind_cores,
            "attempts_file": str(attempts_file),
            "max_restarts": max_restarts,
            "driver": identity(),
        },
        scaling_config=ScalingConfig(
            num_workers=world,
            use_gpu=gpus_per_worker > 0,
            resources_per_worker=resources,
            placement_strategy=placement.upper(),
        ),
        torch_config=TorchConfig(backend="nccl" if gpus_per_worker > 0 else "gloo"),
        run_config=RunConfig(
            storage_path=str(run / "ray_train"),
            name=name,
            # Ray Train v2's FailureConfig (mypy sees the v1 class of ray.air)
            failure_config=FailureConfig(  # type: ignore[call-arg]
                max_failures=max_restarts, controller_failure_limit=start_retries
            ),
            **worker_env,
        ),
    )
    what = (
        f"{_count(world, 'worker')} with {_count(cpus_per_worker, 'CPU')}"
        + (f" and {_count(gpus_per_worker, 'GPU')}" if gpus_per_worker else "")
        + f" each (placement {placement})"
    )
    try:
        # Ray Train hands this variable to its controller when fit() starts it
        with scoped_env(_GROUP_START_TIMEOUT_ENV, f"{group_timeout:g}"):
            _fit_interruptibly(trainer, attempts_file.is_file, start_timeout_s, what, world)
    except (KeyboardInterrupt, WaitTimeout):
        raise
    except Exception as e:
        restarts = max(0, len(_read_attempts(attempts_file)) - 1)
        after = f" after {restarts} restart(s)" if restarts else ""
        raise TrainLaunchError(
            f"Ray Train run failed{after}: {type(e).__name__}: {e}",
            headline=f"Ray Train run failed{after}: {_ray_failure(e)}",
        ) from e
    return _read_attempts(attempts_file)


def _count(n: float, noun: str) -> str:
    """`n` `noun`s, as a person writes it: 1 CPU, 0.5 CPUs, 2 workers."""
    return f"{n:g} {noun}{'' if n == 1 else 's'}"


def _ray_failure(e: BaseException) -> str:
    """What failed, in one line: a rank whose worker process died (the others then fail
    on its lost connection), else the first failing rank's own error."""
    failures = getattr(e, "worker_failures", None)  # Ray Train's WorkerGroupError
    if not isinstance(failures, dict) or not failures:
        return last_error_line(str(e)) or type(e).__name__
    died = [rank for rank, f in sorted(failures.items()) if "died unexpectedly" in str(f)]
    if died:
        ranks = ", ".join(map(str, died))
        return (
            f"the worker process of rank {ranks} died (killed, or out of memory: see the "
            "machine's kernel log)"
        )
    rank, failure = sorted(failures.items())[0]
    cause = getattr(failure, "cause", None) or failure  # a task error wraps the rank's own
    message = str(cause).strip().splitlines()
    return f"rank {rank}: {type(cause).__name__}: {message[0] if message else ''}".rstrip(": ")


def _fit_interruptibly(
    trainer: Any,
    started: Callable[[], bool],
    start_timeout_s: float,
    what: str,
    workers: int,
) -> None:
    """`trainer.fit()`, with Ctrl-C (SIGINT) ending it as a KeyboardInterrupt, and a
    watchdog on the start: until `started()` is true it says what the start waits for
    (`what`: the `workers` Ray Train places), after `_SAY_STARTING_AFTER_S` and then every
    `_SAY_WAITING_EVERY_S`, and after `start_timeout_s` it aborts the run and raises
    `WaitTimeout`.

    Ray Train installs its own SIGINT handler during fit(): it aborts the run's controller,
    and the driver then exits with status 1 as if the run had failed. Kiln's handler aborts
    the controller the same way but remembers why, so the caller records `interrupted` and
    the CLI exits 130.
    """
    import ray

    interrupted = threading.Event()
    timed_out = threading.Event()
    finished = threading.Event()
    controllers: list[Any] = []
    groups = _placement_groups()
    known_groups = set(groups) if groups is not None else None

    def abort() -> None:
        with contextlib.suppress(Exception):
            # a controller waiting for a placement group answers after that wait (60 s)
            ray.get(controllers[0].abort.remote(), timeout=90)

    def register(controller: Any) -> None:
        controllers.append(controller)

        def on_sigint(signum: int, frame: Any) -> None:
            if interrupted.is_set():  # a second Ctrl-C: stop waiting for the abort
                raise KeyboardInterrupt
            interrupted.set()
            abort()

        signal.signal(signal.SIGINT, on_sigint)

    def watchdog() -> None:
        begun = time.monotonic()
        say_at = begun + _SAY_STARTING_AFTER_S
        while not finished.wait(1.0) and not started():
            waited = time.monotonic() - begun
            if waited >= start_timeout_s:
                timed_out.set()
                if controllers:
                    abort()
                return
            if time.monotonic() >= say_at:
                say_at = time.monotonic() + _SAY_WAITING_EVERY_S
                state = _group_state(known_groups, workers)
                _log(0, _start_progress(state, what, waited, start_timeout_s))

    if hasattr(trainer, "_register_sigint_handler"):
        trainer._register_sigint_handler = register
    previous = signal.getsignal(signal.SIGINT)
    threading.Thread(target=watchdog, name="kiln-start-watchdog", daemon=True).start()
    try:
        trainer.fit()
    except KeyboardInterrupt:
        raise
    except Exception as e:
        if interrupted.is_set():
            raise KeyboardInterrupt from e
        if timed_out.is_set():
            raise _start_timeout(what, start_timeout_s) from e
        raise
    finally:
        finished.set()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
    if interrupted.is_set():
        raise KeyboardInterrupt
    if timed_out.is_set():
        raise _start_timeout(what, start_timeout_s)


def _placement_groups() -> dict[str, dict[str, Any]] | None:
    """The cluster's placement groups now, by id; None where Ray cannot say."""
    from ray.util import placement_group_table

    try:
        return dict(placement_group_table())
    except Exception:  # a GCS that does not answer: the progress lines stay generic
        return None


def _group_state(known: set[str] | None, workers: int) -> str | None:
    """The state of the placement group Ray Train made for this start (one of `workers`
    bundles, not among the `known` ones): PENDING while the cluster lacks the resources,
    CREATED once the workers are placed; "" before Ray Train has made it (its controller is
    starting); None where Ray cannot say."""
    if known is None:
        return None
    table = _placement_groups()
    if table is None:
        return None
    states = [
        str(info.get("state", ""))
        for pg, info in table.items()
        if pg not in known and len(info.get("bundles") or {}) == workers
    ]
    live = [s for s in states if s != "REMOVED"]  # (a start Ray Train retries: a new group)
    return live[-1] if live else ""


def _start_progress(state: str | None, what: str, waited: float, start_timeout_s: float) -> str:
    """The line the start's watchdog says, for the placement group's `state`."""
    limit = f"{waited:.0f}s of {start_timeout_s:.0f}s (resources.start_timeout_s)"
    if state == "CREATED":
        return (
            f"Ray Train placed {what} and is starting their processes ({waited:.0f}s so "
            "far): each imports torch and DeepSpeed before it builds the model"
        )
    if state in ("PENDING", "RESCHEDULING"):
        return (
            f"waiting for the cluster to free the resources of {what}: {limit}; other work "
            "holds them or a node left (`ray status` shows what the cluster holds)"
        )
    if state == "":
        return f"Ray Train is starting its controller for {what} ({waited:.0f}s so far)"
    return (
        f"waiting for Ray Train to start {what}: {limit}; `ray status` shows what the cluster holds"
    )


def _start_timeout(what: str, start_timeout_s: float) -> WaitTimeout:
    return WaitTimeout(
        f"Ray Train did not start {what} within {start_timeout_s:.0f}s "
        "(resources.start_timeout_s): the cluster has the CPUs in total, so other work "
        "holds them or a node left; check `ray status`, free the resources or lower "
        "resources.workers, then rerun (a run that had checkpoints resumes with `kiln "
        "resume RUN_DIR`)"
    )


# --------------------------------------------------------------------------- rank entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one local rank: ``python -m kiln.training.launch --config ...``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="TrainConfig as JSON")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--recipe-hash", default="")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bind-cores", action="store_true")
    args = parser.parse_args(argv)
    rank_fork.name_process(f"kiln-rank{os.environ.get('RANK', '')}")
    set_runtime_env()
    from kiln.training.loop import train_worker

    cfg = TrainConfig.model_validate_json(Path(args.config).read_text())
    train_worker(
        cfg,
        args.run_dir,
        resume=args.resume,
        recipe_hash=args.recipe_hash,
        num_threads=args.threads,
        bind_cores=args.bind_cores,
    )
    return 0


if __name__ == "__main__":
    from kiln.process_exit import exit_now

    exit_now(main())
