"""Atomic, resumable training checkpoints under ``{run_dir}/checkpoints/``.

A checkpoint is the folder ``checkpoints/step_{step:08d}/`` holding:

- DeepSpeed's files (model states, each rank's optimizer partition, the LR scheduler) and
  our ``client_state`` (step, epoch, loader position, recipe hash), from
  ``engine.save_checkpoint(..., save_latest=False)``;
- ``rng_rank{r}.pt``: each rank's torch / numpy / python RNG states;
- ``model.pt``: full fp32 weights for eval (`kiln.training.evaluate`), for models up to
  ``checkpoint.model_file_max_params`` (larger ones are consolidated on demand from
  DeepSpeed's files: `kiln.training.export`);
- ``COMPLETE``: a JSON marker written by rank 0 only after every rank finished its part
  (step, world size, ZeRO stage, the model config, file sizes).

``checkpoints/latest`` names the newest complete tag; it is replaced atomically (temp file,
fsync, ``os.replace``) only after ``COMPLETE`` exists. A crash at any point of a save leaves
either the previous ``latest`` (the half-written folder has no ``COMPLETE`` and is ignored,
then pruned) or the new one: never a torn checkpoint. The run directory must be on a file
system every rank can see (local disk on one machine; a shared mount across nodes).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kiln.models.config import ModelConfig
from kiln.training.engine import restore_cpu_adam_step

__all__ = [
    "CHECKPOINTS_DIR",
    "COMPLETE_MARKER",
    "LATEST_FILE",
    "atomic_write_text",
    "checkpoints_dir",
    "complete_checkpoints",
    "is_complete",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "read_complete_marker",
    "restore_rng_state",
    "rng_state",
    "save_checkpoint",
    "step_of_tag",
    "tag_for_step",
]

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
_TAG_RE = re.compile(r"^step_(\d{8,})$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    """``{run_dir}/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS_DIR


def tag_for_step(step: int) -> str:
    """Checkpoint tag of optimizer step `step`: ``step_00000012``."""
    return f"step_{step:08d}"


def step_of_tag(tag: str) -> int | None:
    """Inverse of `tag_for_step`; None for names that are not checkpoint tags."""
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def is_complete(run_dir: str | Path, tag: str) -> bool:
    """True if `tag`'s folder has its COMPLETE marker (every rank finished writing it)."""
    return (checkpoints_dir(run_dir) / tag / COMPLETE_MARKER).is_file()


def read_complete_marker(run_dir: str | Path, tag: str) -> dict[str, Any]:
    """The COMPLETE marker of `tag` (step, world size, ZeRO stage, files)."""
    path = checkpoints_dir(run_dir) / tag / COMPLETE_MARKER
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint marker {path} is unreadable ({e}): use another tag") from e
    return data


def complete_checkpoints(run_dir: str | Path) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and step_of_tag(p.name) is not None]
    return sorted((t for t in tags if is_complete(run_dir, t)), key=lambda t: step_of_tag(t) or 0)


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The tag to resume from: the one `latest` names if it is complete, else the newest
    complete tag (a crash between COMPLETE and moving `latest`), else None."""
    latest = checkpoints_dir(run_dir) / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag and is_complete(run_dir, tag):
            return tag
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and python RNG states."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _full_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """Full fp32 CPU copy of the module's weights on rank 0 (None elsewhere).

    Collective: with ZeRO-3 the parameters are partitioned and every rank takes part in the
    gather. In bf16 training with ZeRO 1-3 the module holds bf16 working copies; the fp32
    master weights are assembled from the optimizer instead (also collective). With ZeRO-0
    and bf16, DeepSpeed exposes no per-parameter master copy and the bf16 weights are saved.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    rank, _ = _rank_world()
    module = engine.module
    master: dict[str, torch.Tensor] = {}
    if engine.bfloat16_enabled():
        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is not None and rank == 0:
                master[name] = full.detach().to("cpu", torch.float32).clone()
    params = list(module.parameters()) if engine.zero_optimization_stage() == 3 else []
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        if rank != 0:
            return None
        state = {
            k: master[k] if k in master else v.detach().to("cpu", torch.float32).clone()
            for k, v in module.state_dict().items()
        }
    return state


def save_checkpoint(
    engine: Any,
    run_dir: str | Path,
    *,
    step: int,
    client_state: dict[str, Any],
    model_config: ModelConfig,
    keep_last: int,
    model_file: bool = True,
    before_commit: Callable[[], None] | None = None,
) -> str:
    """Write checkpoint `step` on every rank (collective: all ranks call it); returns its tag.

    `model_file`: also gather the full fp32 weights into ``model.pt`` (rank 0); without it
    `kiln.training.export` rebuilds them from DeepSpeed's files when asked.

    `before_commit` runs on every rank after all files are written and before the COMPLETE
    marker and `latest` (fault-injection tests kill the process there).
    """
    from kiln.training.evaluate import save_model_file

    rank, world = _rank_world()
    root = checkpoints_dir(run_dir)
    tag = tag_for_step(step)
    tag_dir = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():
            if latest_checkpoint(run_dir) == tag:
                raise RuntimeError(
                    f"checkpoint {tag_dir} is the latest complete checkpoint; refusing to "
                    "overwrite it"
                )
            shutil.rmtree(tag_dir)  # leftovers of a crashed save of the same step
    _barrier()
    engine.save_checkpoint(str(root), tag, client_state=client_state, save_latest=False)
    tag_dir.mkdir(parents=True, exist_ok=True)
    rng_path = tag_dir / f"rng_rank{rank}.pt"
    tmp = rng_path.with_name(rng_path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(rng_state(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, rng_path)
    if model_file:
        state = _full_state_dict(engine)
        if rank == 0:
            assert state is not None
            save_model_file(str(tag_dir / "model.pt"), state, model_config, step)
    _barrier()
    if before_commit is not None:
        before_commit()
    if rank == 0:
        files = {}
        for p in sorted(tag_dir.rglob("*")):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                files[str(p.relative_to(tag_dir))] = p.stat().st_size
        _fsync_dir(tag_dir)
        marker = {
            "tag": tag,
            "step": step,
            "world_size": world,
            "zero_stage": engine.zero_optimization_stage(),
            "model_config": model_config.model_dump(mode="json"),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
        }
        atomic_write_text(tag_dir / COMPLETE_MARKER, json.dumps(marker, indent=2) + "\n")
        atomic_write_text(root / LATEST_FILE, tag + "\n")
    _barrier()
    if rank == 0:
        prune_checkpoints(run_dir, keep_last)
    return tag


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[str]:
    """Delete complete checkpoints older than the newest `keep_last`, and half-written tag
    folders; never the one `latest` names. Returns the removed tags."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    latest = latest_checkpoint(run_dir)
    complete = complete_checkpoints(run_dir)
    keep = set(complete[-keep_last:]) | ({latest} if latest else set())
    removed = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or step_of_tag(p.name) is None or p.name in keep:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def load_checkpoint(engine: Any, run_dir: str | Path, tag: str) -> dict[str, Any]:
    """Load `tag` into `engine` (weights, optimizer, LR schedule) and this rank's RNG states;
    returns the client state. Collective: every rank calls it."""
    rank, world = _rank_world()
    if not is_complete(run_dir, tag):
        raise FileNotFoundError(
            f"checkpoint {checkpoints_dir(run_dir) / tag} is not complete (no "
            f"{COMPLETE_MARKER} marker): resume from latest_checkpoint(run_dir) instead"
        )
    marker = read_complete_marker(run_dir, tag)
    if marker.get("world_size") != world:
        raise ValueError(
            f"checkpoint {tag} was written by {marker.get('world_size')} ranks but this run "
            f"has {world}: resume with num_workers={marker.get('world_size')}"
        )
    if marker.get("zero_stage") != engine.zero_optimization_stage():
        raise ValueError(
            f"checkpoint {tag} was written with zero.stage={marker.get('zero_stage')} but this "
            f"run uses zero.stage={engine.zero_optimization_stage()}: resume with the same stage"
        )
    path, client_state = engine.load_checkpoint(
        str(checkpoints_dir(run_dir)),
        tag,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {run_dir}")
    restore_cpu_adam_step(engine)
    rng_path = checkpoints_dir(run_dir) / tag / f"rng_rank{rank}.pt"
    restore_rng_state(torch.load(rng_path, map_location="cpu", weights_only=False))
    return dict(client_state or {})
