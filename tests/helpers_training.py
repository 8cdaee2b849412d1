"""Shared training-test settings: the tiny models every multi-rank test trains."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kiln.models.build import build_model
from kiln.models.config import ModelConfig
from kiln.models.tokenizer import tokenize
from kiln.training import TrainSummary
from kiln.training.config import TrainConfig
from kiln.training.launch import free_port
from kiln.training.objectives.clip import clip_loss

__all__ = [
    "MICRO_MODEL",
    "SHORT_RUN_STEPS",
    "TINY_MODEL",
    "clip_loss_of",
    "destroy_groups",
    "gloo_group",
    "leave_gloo_group",
    "one_rank_env",
    "rank_env",
    "rewind_run",
    "run_world",
    "seeded_model",
    "short_run_config",
    "spawn_gloo_ranks",
    "tiny_flavor",
    "word_batch",
]

#: A CLIP small enough for 2-rank DeepSpeed runs on 2 CPU cores in seconds.
TINY_MODEL: dict[str, Any] = {
    "flavor": "clip-tiny",
    "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
    "text": {"width": 32, "layers": 1, "heads": 2, "context_length": 16},
    "embed_dim": 16,
}

#: Smaller still, for single-step gradient comparisons between processes.
MICRO_MODEL: dict[str, Any] = {
    **TINY_MODEL,
    "vision": {**TINY_MODEL["vision"], "width": 16},
    "text": {**TINY_MODEL["text"], "width": 16, "context_length": 12},
}


#: Steps of `short_run_config`: checkpoints at 2, 4, 6.
SHORT_RUN_STEPS = 6


def short_run_config(dataset: str) -> TrainConfig:
    """A 6-step, 2-rank-sized ZeRO-2 run of TINY_MODEL checkpointing every 2 steps: the run
    the restart and multi-node tests train with every launcher and compare bitwise."""
    return TrainConfig.model_validate(
        {
            "data": {"dataset": dataset, "batch_size": 4, "num_workers": 1, "shuffle_buffer": 8},
            "model": TINY_MODEL,
            "optim": {"lr": 2e-3, "warmup_steps": 1},
            "zero": {"stage": 2},
            "checkpoint": {"every_steps": 2},
            "max_steps": SHORT_RUN_STEPS,
            "log_every": 1,
            "seed": 5,
        }
    )


def tiny_flavor(arch: str) -> dict[str, Any]:
    """TINY_MODEL's sizes in family `arch` (clip, siglip, coca, mae)."""
    if arch == "mae":
        return {
            "flavor": "mae-tiny",
            "vision": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2},
            "pixel_decoder": {"width": 32, "layers": 1, "heads": 2},
            "embed_dim": 16,
        }
    model = {**TINY_MODEL, "flavor": f"{arch}-tiny"}
    if arch == "coca":
        model["decoder"] = {"width": 32, "layers": 1, "heads": 2, "pooler_queries": 4}
    return model


def clip_loss_of(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`clip_loss` of a CLIP/CoCa forward's outputs."""
    return clip_loss(outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"])


def seeded_model(cfg: ModelConfig) -> nn.Module:
    """The model of `cfg` built from seed 0 (the same weights in every process)."""
    torch.manual_seed(0)
    return build_model(cfg)


def spawn_gloo_ranks(
    worker: Callable[..., None],
    nprocs: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *args: Any,
) -> Any:
    """Run ``worker(rank, *args, port, out)`` in `nprocs` spawned processes that join one
    gloo group on loopback (`port`); returns what rank 0 saved at `out` (``torch.save``)."""
    out = tmp_path / "rank0.pt"
    if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in os.environ:
        # keep gloo on loopback even where the hostname resolves to a routable address
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(*args, free_port(), str(out)), nprocs=nprocs, join=True)
    return torch.load(out, weights_only=True)


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """A `spawn_gloo_ranks` worker's gloo group on loopback (`port`), one torch thread per
    rank, for workers that call torch.distributed themselves: left by
    `leave_gloo_group` when the body succeeds, destroyed at once when it raises (a
    barrier then would wait for ranks that may never come)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        yield
    except BaseException:
        destroy_groups()
        raise
    leave_gloo_group()


def leave_gloo_group() -> None:
    """End a `spawn_gloo_ranks` worker's group the way `kiln.training.loop` ends a run's:
    every rank reaches a barrier before any destroys its groups (DeepSpeed's cached ones
    too). A rank that tore down and exited while its peer was still in gloo has died of
    SIGABRT ("terminate called without an active exception") and failed the test."""
    dist.barrier()
    destroy_groups()


def destroy_groups() -> None:
    """Destroy this process's process groups, DeepSpeed's cached ones too when DeepSpeed
    made them (a later world in the same process would otherwise reuse stale ones)."""
    ds_comm = sys.modules.get("deepspeed.comm.comm")  # where its `cdb` global lives
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The variables naming rank `rank` of a `world`-rank world on 127.0.0.1 (`port`):
    what DeepSpeed and `kiln.training.engine.init_distributed` read to make the group."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def one_rank_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default this process's environment) plus a one-rank world on 127.0.0.1 with
    a free MASTER_PORT and the repository on PYTHONPATH: what a subprocess needs to call
    `kiln.training.engine.init_distributed` as a rank."""
    return {
        **(os.environ if base is None else base),
        **rank_env(0, 1, free_port()),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }


def word_batch(cfg: ModelConfig, words: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One image-text batch per word: seeded random images, captions "a {word} thing"."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(len(words), 3, cfg.image_size, cfg.image_size, generator=gen)
    return images, tokenize([f"a {w} thing" for w in words], cfg.context_length)


def rewind_run(src: Path, dst: Path, step: int) -> Path:
    """A copy of finished run `src` at `dst` as it stood when checkpoint `step` was its
    latest: later checkpoints removed, `latest` naming `step`, `metrics.jsonl` ending at
    `step`. Resuming it must retrain the later steps exactly as `src` did, so a resume test
    needs no killed run of its own (killing runs is tested once, in test_resume.py)."""
    from kiln.training.checkpoint import checkpoints_dir, step_of_tag, tag_for_step

    shutil.copytree(src, dst)
    ckpts = checkpoints_dir(dst)
    for tag_dir in ckpts.iterdir():
        at = step_of_tag(tag_dir.name)
        if at is not None and at > step:
            shutil.rmtree(tag_dir)
    tag = tag_for_step(step)
    assert (ckpts / tag).is_dir(), f"{src} kept no checkpoint at step {step}"
    (ckpts / "latest").write_text(tag)
    metrics = dst / "metrics.jsonl"
    if metrics.is_file():
        kept = [
            line
            for line in metrics.read_text().splitlines(keepends=True)
            if json.loads(line).get("step", 0) <= step
        ]
        metrics.write_text("".join(kept))
    return dst


def run_world(
    cmds: list[list[str]], envs: list[dict[str, str]], logs: list[Path], *, ok: bool = True
) -> list[str]:
    """Start one process per command, wait for all; returns their outputs. `ok`: every
    process must exit 0 (False: every one must fail)."""
    procs = []
    for cmd, env, path in zip(cmds, envs, logs, strict=True):
        with open(path, "wb") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = [path.read_text() for path in logs]
    assert all((code == 0) == ok for code in codes), "\n".join(o[-4000:] for o in outs)
    return outs


def last_loss_per_step(run: Path) -> dict[int, float]:
    """Each step's loss in `metrics.jsonl`; a later attempt's record of a step wins."""
    out: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def check_healed(
    run: Path, summary: TrainSummary, reference: list[float], restarts: int = 1
) -> None:
    """A `short_run_config` run whose rank 1 was SIGKILLed after step 5 once was restarted
    from step 4 and finished with the uninterrupted `reference` losses, bitwise (in
    `restarts` restarts: more when a rank was also killed after the last checkpoint, which
    leaves the restarted group nothing to train and the summary of the attempt that did)."""
    assert summary.restarts == restarts
    assert (summary.resumed_from, summary.first_step, summary.last_step) == (4, 5, SHORT_RUN_STEPS)
    assert summary.losses == reference[4:]  # exact
    assert last_loss_per_step(run) == dict(enumerate(reference, start=1))
    assert (run / ".fault-sigkill-rank1-step5").is_file()  # the fault did fire
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(5) == 2  # trained once before the kill and once after the restart


def running(pids: set[int]) -> set[int]:
    """Those of `pids` whose process still runs (a zombie, waiting to be reaped, does not)."""
    alive = set()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
    return alive


def local_ranks(driver: psutil.Process) -> set[int]:
    """The pids of the local launcher's ranks under `driver` (forked by its rank fork
    server, or started as fresh processes), not their DataLoader workers."""
    named = {p.pid: p for p in driver.children(recursive=True) if _is_rank(p)}
    return {pid for pid, p in named.items() if p.ppid() not in named}


def _is_rank(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return p.name().startswith("kiln-rank")
    return False
