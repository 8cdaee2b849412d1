"""The torchrun / srun launcher: this process is one rank, the world comes from the environment.

`launcher="torchrun"` lets a cluster's own process starter run kiln, one rank per process:

- torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
  for each process it starts (``torchrun --nnodes 2 --nproc_per_node 8 ... -m kiln train
  RECIPE --launcher torchrun`` on every node);
- srun sets ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID``; the job script exports
  ``MASTER_ADDR`` (the allocation's first node) and ``MASTER_PORT`` (``srun kiln train RECIPE
  --launcher torchrun``).

`rank_env` reads either into a `RankEnv` (torchrun's variables win when both are set, as
they do for torchrun inside a Slurm allocation) and names what is missing otherwise;
`run_rank` exports it as torch's ``env://`` variables and trains this rank in-process.

A world started again by its starter resumes from the latest complete checkpoint: a requeued
Slurm job (``SLURM_RESTART_COUNT`` > 0, the same on every task) or ranks restarted by
torchrun (``TORCHELASTIC_RESTART_COUNT`` > 0). torchrun counts restarts per node (the agent
whose rank failed counts one, the others restart their ranks without counting), so
`run_rank` takes the largest count of all ranks once the process group is up, and every rank
decides the same. torchrun's own ``--max-restarts`` is not a way to heal a kiln run on CPU,
though: tried with torch 2.13 and gloo (``--rdzv-backend c10d``), the restarted ranks could
not form DeepSpeed's process groups (gloo read the dead ranks' addresses from the previous
attempt's rendezvous keys; one node: connection refused, two nodes: a hang). Use kiln's
``ray`` or ``local`` launcher with ``max_restarts`` for that.

`leave_in_order` ends a torchrun world's processes so that the lead's node leaves last.
torchrun's agents meet in an exit barrier on a store that node 0's agent serves; when that
agent gets through first, it exits and closes the store while another node's agent is
still waiting on it, which then logs a traceback ("Error waiting on exit barrier ...
Failed to recv", pytorch/pytorch#69520; harmless, but it is library noise at the end of a
good run). So at the end of `kiln train` every other rank says on that store that it is
ending, right before its process ends, and the lead waits for all of them, plus a grace
for their agents to see them gone, before its own process ends.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping, MutableMapping
from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from kiln.training.checkpoint import latest_checkpoint
from kiln.training.config import TrainConfig
from kiln.training.remote_run import RUN_URL_ENV, check_node_staging

__all__ = [
    "CONNECT_TIMEOUT_S",
    "LEAVE_GRACE_S",
    "LEAVE_TIMEOUT_S",
    "RankEnv",
    "export_rank_env",
    "leave_in_order",
    "rank_env",
    "run_rank",
]

#: how long the lead waits for the other ranks of a torchrun world to end
LEAVE_TIMEOUT_S = 60.0
#: after the last of them, for their agents to see them gone (torchrun checks its workers
#: every 0.1 s by default, ``--monitor-interval``)
LEAVE_GRACE_S = 1.0
#: how long a rank tries to reach torchrun's store at its end (it is up while the lead runs)
CONNECT_TIMEOUT_S = 5.0

_HOW = (
    "start it with `torchrun --nnodes N --nproc_per_node M --node_rank I --master_addr HEAD "
    "--master_port PORT -m kiln train RECIPE --launcher torchrun` on each node, or `srun kiln "
    "train RECIPE --launcher torchrun` with MASTER_ADDR and MASTER_PORT exported; to start "
    "the ranks from kiln instead, use --launcher local or --launcher ray"
)


class RankEnv(BaseModel):
    """Where this process sits in the world, as the starter (torchrun or srun) says."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: Literal["torchrun", "srun"]
    restarts: int = 0


def _int(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer: {_HOW}") from None


def rank_env(environ: Mapping[str, str] | None = None) -> RankEnv:
    """This process's rank, world size and rendezvous from torchrun's or srun's variables
    (default: ``os.environ``); a `ValueError` naming the missing ones otherwise."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        source: Literal["torchrun", "srun"] = "torchrun"
        names = {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK"}
        restart_var = "TORCHELASTIC_RESTART_COUNT"
    elif "SLURM_PROCID" in env:
        source = "srun"
        names = {
            "rank": "SLURM_PROCID",
            "world_size": "SLURM_NTASKS",
            "local_rank": "SLURM_LOCALID",
        }
        restart_var = "SLURM_RESTART_COUNT"
    else:
        raise ValueError(
            "--launcher torchrun runs one rank per process, but neither torchrun's RANK / "
            f"WORLD_SIZE nor srun's SLURM_PROCID / SLURM_NTASKS are set: {_HOW}"
        )
    required = [*names.values(), "MASTER_ADDR", "MASTER_PORT"]
    missing = [n for n in required if not env.get(n)]
    if missing:
        hint = (
            ' (export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
            " and a free MASTER_PORT in the job script)"
            if source == "srun"
            else ""
        )
        raise ValueError(
            f"--launcher torchrun ({source}): {', '.join(missing)} not set{hint}: {_HOW}"
        )
    values = {field: _int(env, name) for field, name in names.items()}
    if not 0 <= values["rank"] < values["world_size"]:
        raise ValueError(
            f"{names['rank']}={values['rank']} is not in 0..{names['world_size']}-1="
            f"{values['world_size'] - 1}: {_HOW}"
        )
    return RankEnv(
        **values,
        master_addr=env["MASTER_ADDR"],
        master_port=_int(env, "MASTER_PORT"),
        source=source,
        restarts=_int(env, restart_var) if env.get(restart_var) else 0,
    )


def export_rank_env(ranks: RankEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Set torch's ``env://`` variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) from `ranks`
    in `environ` (default: ``os.environ``), so srun's ranks initialise like torchrun's."""
    env = os.environ if environ is None else environ
    env.update(
        {
            "RANK": str(ranks.rank),
            "WORLD_SIZE": str(ranks.world_size),
            "LOCAL_RANK": str(ranks.local_rank),
            "MASTER_ADDR": ranks.master_addr,
            "MASTER_PORT": str(ranks.master_port),
        }
    )


def _check_staging_folders(run: Path, ranks: RankEnv) -> None:
    """Collective: every rank raises the same ValueError if some node shares its staging
    folder with another (`check_node_staging`), instead of that node alone stopping while
    the others wait for it in their next collective."""
    import torch.distributed as dist

    problem = ""
    if ranks.local_rank == 0:
        try:
            check_node_staging(run, ranks.rank)
        except ValueError as e:
            problem = str(e)
    found: list[str] = [""] * ranks.world_size
    dist.all_gather_object(found, problem)
    first = next((p for p in found if p), None)
    if first is not None:
        raise ValueError(first)


def run_rank(
    cfg: TrainConfig,
    run: Path,
    ranks: RankEnv,
    *,
    num_threads: int,
    resume: bool,
    recipe_hash: str,
    bind_cores: bool = False,
) -> int:
    """Train this process's rank to the end (collective with the other processes); returns
    how many times the starter restarted the ranks (the largest count of any rank).

    A restarted world resumes from the latest complete checkpoint when there is one; a
    first start refuses a run dir that already holds checkpoints unless `resume`.
    """
    import torch
    import torch.distributed as dist

    from kiln.training.engine import init_distributed
    from kiln.training.loop import check_run_dir, train_worker

    export_rank_env(ranks)
    created = init_distributed()
    try:
        count = torch.tensor([ranks.restarts])
        if dist.get_backend() == dist.Backend.NCCL:
            count = count.cuda()
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        restarts = int(count.item())
        if os.environ.get(RUN_URL_ENV):  # every node has staged the remote run dir by now
            _check_staging_folders(run, ranks)
        if restarts and latest_checkpoint(run) is not None:
            resume = True
        check_run_dir(run, resume)
        train_worker(
            cfg,
            str(run),
            resume=resume,
            recipe_hash=recipe_hash,
            num_threads=num_threads,
            bind_cores=bind_cores,
        )
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
    return restarts


def _leave_key(environ: Mapping[str, str], rank: int) -> str:
    # not per attempt: torchrun counts restarts per node, so nodes may disagree on it (a
    # stale key of an earlier attempt only lets the lead go a little early)
    return f"kiln/leave/{environ.get('TORCHELASTIC_RUN_ID', 'none')}/{rank}"


def leave_in_order(
    environ: Mapping[str, str] | None = None,
    *,
    timeout_s: float = LEAVE_TIMEOUT_S,
    grace_s: float = LEAVE_GRACE_S,
    say: Callable[[str], None] | None = None,
) -> Callable[[], None] | None:
    """For the last moments of a ``kiln`` process that is one rank of a multi-node torchrun
    world (module doc); elsewhere a no-op returning None.

    The lead (rank 0) waits here until every other rank has said it is ending (at most
    `timeout_s`; `say` tells the user when that takes more than a few seconds), then
    `grace_s`. Any other rank gets back what to call right before its process ends.
    Problems reaching torchrun's store are ignored: they must not fail a finished run.
    """
    env = os.environ if environ is None else environ
    agents = env.get("GROUP_WORLD_SIZE", "1")
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not agents.isdigit():
        return None
    try:
        ranks = rank_env(env)
    except ValueError:
        return None
    if int(agents) < 2 or ranks.source != "torchrun":
        return None  # one agent: its exit barrier waits for nobody
    import torch.distributed as dist

    def connect() -> dist.TCPStore:
        return dist.TCPStore(
            ranks.master_addr,
            ranks.master_port,
            is_master=False,
            timeout=timedelta(seconds=CONNECT_TIMEOUT_S),
        )

    if ranks.rank != 0:

        def ending() -> None:
            with contextlib.suppress(Exception):
                connect().set(_leave_key(env, ranks.rank), "1")

        return ending
    others = [_leave_key(env, r) for r in range(1, ranks.world_size)]
    start = time.monotonic()
    told = False
    with contextlib.suppress(Exception):
        store = connect()
        while time.monotonic() - start < timeout_s:
            if store.check(others):
                time.sleep(grace_s)
                break
            if not told and say is not None and time.monotonic() - start > 3.0:
                say("waiting for the other ranks' processes to end")
                told = True
            time.sleep(0.05)
    return None
