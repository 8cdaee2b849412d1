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
  (step, world size, ZeRO stage, the model config, every file's size and, up to
  ``HASHED_FILE_MAX_BYTES``, its sha256).

Resume picks the newest complete checkpoint whose files still match their marker
(`resume_checkpoint`); newer damaged ones are renamed ``{tag}.damaged`` (kept, no longer
tags) and `latest` moves back, so a truncated shard costs the steps since the previous
checkpoint, not the run.

Elastic resume: a checkpoint written by N ranks resumes on M != N ranks. ZeRO 1-3 shard the
optimizer state by rank, so the tag is first converted, once, by DeepSpeed's own
``ds_to_universal`` into ``step_.../universal/`` (per-parameter fp32 weights and Adam
moments), which an engine built with ``load_universal`` reads at any world size. ZeRO-0
checkpoints hold whole states and load as they are. Torch RNG states are per rank and do
not carry over: an elastic resume reseeds each rank from (seed, step, rank).

``checkpoints/latest`` names the newest complete tag; it is replaced atomically (temp file,
fsync, ``os.replace``) only after ``COMPLETE`` exists. A crash at any point of a save leaves
either the previous ``latest`` (the half-written folder has no ``COMPLETE`` and is ignored,
then pruned) or the new one: never a torn checkpoint. The run directory must be on a file
system every rank can see (local disk on one machine; a shared mount across nodes).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kiln import storage
from kiln.models.checkpoint_index import (
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    LATEST_FILE,
    checkpoints_dir,
    complete_checkpoints,
    is_complete,
    latest_checkpoint,
    read_complete_marker,
    step_of_tag,
    tag_for_step,
)
from kiln.models.config import ModelConfig
from kiln.training.engine import restore_cpu_adam_step

__all__ = [
    "CHECKPOINTS_DIR",
    "COMPLETE_MARKER",
    "DAMAGED_SUFFIX",
    "HASHED_FILE_MAX_BYTES",
    "LATEST_FILE",
    "UNIVERSAL_DIR",
    "check_resumable",
    "checkpoints_dir",
    "complete_checkpoints",
    "is_complete",
    "latest_checkpoint",
    "load_checkpoint",
    "prepare_resume",
    "prune_checkpoints",
    "read_complete_marker",
    "restore_rng_state",
    "resume_checkpoint",
    "rng_state",
    "save_checkpoint",
    "saved_param_alignment",
    "seed_everything",
    "set_aside_damaged",
    "step_of_tag",
    "tag_for_step",
    "verify_checkpoint",
]

UNIVERSAL_DIR = "universal"
#: Files up to this size get a sha256 in the COMPLETE marker (RNG states, small models'
#: shards); every file gets its size. Resume verifies both.
HASHED_FILE_MAX_BYTES = 64 * 2**20
#: Suffix a checkpoint folder gets when resume finds it damaged: kept, but no longer a tag.
DAMAGED_SUFFIX = ".damaged"
#: ModelConfig fields a resume may change: they do not change the weights' shapes or values.
_FREE_MODEL_FIELDS = {"flavor", "activation_checkpointing", "init_logit_scale", "init_logit_bias"}


def _write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old content or the new, never a mix, and
    it survives a power loss (`kiln.storage.atomic_write`, durable)."""
    storage.atomic_write(path, text.encode(), durable=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(run_dir: str | Path, tag: str) -> str | None:
    """Why `tag` cannot be resumed (a file missing, truncated or changed against its
    COMPLETE marker), or None when every recorded file is as it was written."""
    tag_dir = checkpoints_dir(run_dir) / tag
    try:
        marker = read_complete_marker(run_dir, tag)
    except ValueError as e:
        return str(e)
    hashes = marker.get("sha256", {})
    for name, size in marker.get("files", {}).items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, {size} when written"
        if name in hashes and _sha256(path) != hashes[name]:
            return f"{name} changed since it was written (sha256 differs)"
    return None


def resume_checkpoint(run_dir: str | Path) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete checkpoint whose files verify, and the (tag, reason) of each
    newer one skipped as damaged. Not collective; the same on every rank."""
    skipped: list[tuple[str, str]] = []
    for tag in reversed(complete_checkpoints(run_dir)):
        reason = verify_checkpoint(run_dir, tag)
        if reason is None:
            return tag, skipped
        skipped.append((tag, reason))
    return None, skipped


def set_aside_damaged(
    run_dir: str | Path, skipped: list[tuple[str, str]], fallback: str | None
) -> None:
    """Rename each damaged tag folder to ``{tag}.damaged`` (kept for inspection, no longer
    a checkpoint) and point `latest` at `fallback`. Rank 0 only."""
    root = checkpoints_dir(run_dir)
    for tag, _ in skipped:
        target = root / f"{tag}{DAMAGED_SUFFIX}"
        n = 1
        while target.exists():
            n += 1
            target = root / f"{tag}{DAMAGED_SUFFIX}{n}"
        os.replace(root / tag, target)
    if fallback is not None:
        _write_text(root / LATEST_FILE, fallback + "\n")
    else:
        (root / LATEST_FILE).unlink(missing_ok=True)
    storage.fsync_dir(root)


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


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


#: What DeepSpeed's `save_checkpoint` copies into the checkpoints folder (not kept).
_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


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
    mirror: str | None = None,
) -> str:
    """Write checkpoint `step` on every rank (collective: all ranks call it); returns its tag.

    `model_file`: also gather the full fp32 weights into ``model.pt`` (rank 0); without it
    `kiln.training.export` rebuilds them from DeepSpeed's files when asked.

    `before_commit` runs on every rank after all files are written and before the COMPLETE
    marker and `latest` (fault-injection tests kill the process there).

    `mirror`: the remote run dir `run_dir` stages (`kiln.training.remote_run`): each node's
    first rank uploads the tag's files before the commit, rank 0 uploads the marker, then
    `latest`, once they are written locally.
    """
    from kiln.models.weights import save_model_file

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
    if rank == 0:
        # DeepSpeed copies its recovery scripts beside the checkpoints; its zero_to_fp32.py
        # needs huggingface_hub, which kiln does not install. `kiln export` is the same
        # conversion, offline, with kiln's own files: ship no script that fails.
        for script in _RECOVERY_SCRIPTS:
            (root / script).unlink(missing_ok=True)
    tag_dir.mkdir(parents=True, exist_ok=True)
    with storage.atomic_open(tag_dir / f"rng_rank{rank}.pt", durable=True) as f:
        torch.save(rng_state(), f)
    if model_file:
        state = _full_state_dict(engine)
        if rank == 0:
            assert state is not None
            save_model_file(str(tag_dir / "model.pt"), state, model_config, step)
    _barrier()
    if before_commit is not None:
        before_commit()
    node_first = int(os.environ.get("LOCAL_RANK", rank)) == 0
    listed: list[tuple[dict[str, int], dict[str, str]]] = []
    if mirror is not None:
        from kiln.training.remote_run import push_checkpoint

        if node_first:
            push_checkpoint(run_dir, mirror, tag, files=True, commit=False)
        # each node stages into a folder of its own (torchrun on several hosts): the marker
        # lists what every node wrote, as each node's first rank found it (also a barrier:
        # every node's files are up before rank 0 commits)
        listed = _gather(_tag_files(tag_dir) if node_first else ({}, {}))
    if rank == 0:
        files, hashes = {}, {}
        for node_files, node_hashes in listed or [_tag_files(tag_dir)]:
            files.update(node_files)
            hashes.update(node_hashes)
        marker = {
            "tag": tag,
            "step": step,
            "world_size": world,
            "zero_stage": engine.zero_optimization_stage(),
            "param_alignment": _param_alignment(engine),
            "model_config": model_config.model_dump(mode="json"),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
            "sha256": hashes,
        }
        _write_text(tag_dir / COMPLETE_MARKER, json.dumps(marker, indent=2) + "\n")
        _write_text(root / LATEST_FILE, tag + "\n")
        if mirror is not None:
            from kiln.training.remote_run import prune_remote, push_checkpoint

            push_checkpoint(run_dir, mirror, tag, files=False, commit=True)
            prune_remote(mirror, keep_last, tag)
    _barrier()
    if rank == 0:
        prune_checkpoints(run_dir, keep_last)
    elif mirror is not None and node_first:
        _prune_node_staging(run_dir, tag)
    return tag


def _param_alignment(engine: Any) -> bool:
    """Whether `engine`'s ZeRO 1-2 flat buffers pad each parameter to 16 bytes: the layout
    its optimizer states are saved in, which a same-size resume must build again."""
    return engine.zero_optimization_stage() in (1, 2) and bool(engine.zero_parameter_alignment())


def saved_param_alignment(run_dir: str | Path, tag: str) -> bool:
    """The ZeRO parameter layout checkpoint `tag` was written with (`save_checkpoint`); a
    checkpoint from before kiln recorded it was written unaligned."""
    return bool(read_complete_marker(run_dir, tag).get("param_alignment", False))


def _tag_files(tag_dir: Path) -> tuple[dict[str, int], dict[str, str]]:
    """(size, sha256 of those up to `HASHED_FILE_MAX_BYTES`) of each file in checkpoint
    folder `tag_dir`, every file and the folder fsynced: what its COMPLETE marker records."""
    files, hashes = {}, {}
    for p in sorted(tag_dir.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            name = str(p.relative_to(tag_dir))
            files[name] = p.stat().st_size
            if files[name] <= HASHED_FILE_MAX_BYTES:
                hashes[name] = _sha256(p)
    storage.fsync_dir(tag_dir)
    return files, hashes


def _gather(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _prune_node_staging(run_dir: str | Path, current: str) -> None:
    """On a node other than rank 0's, in a staged run: remove the tag folders of this
    node's staging folder but `current` that have no COMPLETE marker here. Rank 0 writes
    the marker on its own node, so another node's own folder never gets one (and its
    files are on object storage once the commit is done); where the nodes share one
    folder, complete tags are rank 0's to prune."""
    root = checkpoints_dir(run_dir)
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        tag = p.name
        if step_of_tag(tag) is None or tag == current or not p.is_dir():
            continue
        if not is_complete(run_dir, tag):
            shutil.rmtree(p, ignore_errors=True)


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


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
    return out


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted.key, old value, new value)`` for each leaf of two nested config dumps
    that differs (a key missing on one side has value None there), in key order."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _check_model_config(tag: str, saved: dict[str, Any] | None, model: ModelConfig) -> None:
    if saved is None:  # markers of older kiln versions do not record it
        return
    diffs = [
        f"model.{k}={old!r} (this run: {new!r})"
        for k, old, new in changed_fields(saved, model.model_dump(mode="json"))
        if k.split(".")[-1] not in _FREE_MODEL_FIELDS
    ]
    if diffs:
        raise ValueError(
            f"checkpoint {tag} was trained with {', '.join(diffs)}: resume with the "
            "checkpoint's model settings, or train into a new run_dir"
        )


def _to_universal(run_dir: str | Path, tag: str) -> Path:
    """``{tag}/universal``, made once from the tag's ZeRO shards with DeepSpeed's converter
    (in a subprocess: it starts worker pools and prints progress bars)."""
    tag_dir = checkpoints_dir(run_dir) / tag
    target = tag_dir / UNIVERSAL_DIR
    if (target / COMPLETE_MARKER).is_file():
        return target
    tmp = tag_dir / f".{UNIVERSAL_DIR}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
    cmd += ["--input_folder", str(tag_dir), "--output_folder", str(tmp)]
    # kiln's modules carry no universal-checkpoint metadata (no tensor/pipeline parallelism)
    cmd += ["--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(
            f"converting checkpoint {tag_dir} to DeepSpeed's universal format failed (exit "
            f"{proc.returncode}); resume on the world size that wrote it instead. Converter "
            f"output:\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"tag": tag}) + "\n")
    os.replace(tmp, target)  # a folder: renamed whole
    storage.fsync_dir(tag_dir)
    return target


def check_resumable(
    run_dir: str | Path, tag: str, *, zero_stage: int, model: ModelConfig
) -> dict[str, Any]:
    """The COMPLETE marker of `tag`, after checking this run's ZeRO stage and model settings
    match the checkpoint's (errors name each difference). World size may differ."""
    marker = read_complete_marker(run_dir, tag)
    if marker.get("zero_stage") != zero_stage:
        raise ValueError(
            f"checkpoint {tag} was written with zero.stage={marker.get('zero_stage')} but this "
            f"run uses zero.stage={zero_stage}: resume with the same stage"
        )
    _check_model_config(tag, marker.get("model_config"), model)
    return marker


def prepare_resume(
    run_dir: str | Path,
    tag: str,
    *,
    zero_stage: int,
    model: ModelConfig,
    log: Callable[[str], None],
) -> bool:
    """Check `tag` can be resumed with this run's settings; returns True for an elastic
    resume (another world size), after making its universal form (rank 0 converts, every
    rank waits). Collective: every rank calls it, before building its engine."""
    rank, world = _rank_world()
    marker = check_resumable(run_dir, tag, zero_stage=zero_stage, model=model)
    old_world = marker.get("world_size")
    elastic = old_world != world
    if elastic and zero_stage > 0:
        if rank == 0:
            started = time.perf_counter()
            log(
                f"elastic resume: {tag} was written by {old_world} ranks, this run has {world}; "
                "converting it to DeepSpeed's universal checkpoint format (once per checkpoint)"
            )
            _to_universal(run_dir, tag)
            log(f"converted {tag} in {time.perf_counter() - started:.1f}s")
        _barrier()
    elif elastic and rank == 0:
        log(f"elastic resume: {tag} was written by {old_world} ranks, this run has {world}")
    return elastic


def load_checkpoint(engine: Any, run_dir: str | Path, tag: str, *, seed: int = 0) -> dict[str, Any]:
    """Load `tag` into `engine` (weights, optimizer, LR schedule) and this rank's RNG states;
    returns the client state. Collective: every rank calls it, after `prepare_resume`.

    At another world size than the checkpoint's, ZeRO 1-3 engines must have been built with
    ``load_universal`` (`kiln.training.engine.build_engine`) and each rank's RNGs are
    seeded from (`seed`, step, rank) instead of restored."""
    rank, world = _rank_world()
    if not is_complete(run_dir, tag):
        raise FileNotFoundError(
            f"checkpoint {checkpoints_dir(run_dir) / tag} is not complete (no "
            f"{COMPLETE_MARKER} marker): resume from latest_checkpoint(run_dir) instead"
        )
    marker = read_complete_marker(run_dir, tag)
    if marker.get("zero_stage") != engine.zero_optimization_stage():
        raise ValueError(
            f"checkpoint {tag} was written with zero.stage={marker.get('zero_stage')} but this "
            f"run uses zero.stage={engine.zero_optimization_stage()}: resume with the same stage"
        )
    elastic = marker.get("world_size") != world
    universal = bool(engine.load_universal_checkpoint())
    if elastic and engine.zero_optimization_stage() > 0 and not universal:
        raise ValueError(
            f"checkpoint {tag} was written by {marker.get('world_size')} ranks and this run has "
            f"{world}: call prepare_resume() and build the engine with load_universal=True"
        )
    load_dir, load_tag = checkpoints_dir(run_dir), tag
    if universal:
        load_dir, load_tag = checkpoints_dir(run_dir) / tag, UNIVERSAL_DIR
    path, client_state = engine.load_checkpoint(
        str(load_dir),
        load_tag,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {run_dir}")
    restore_cpu_adam_step(engine)
    if elastic:
        from kiln.training.data import derive_rng

        step = int(marker.get("step", 0))
        seed_everything(int(derive_rng("elastic", seed, step, rank).integers(2**62)))
    else:
        rng_path = checkpoints_dir(run_dir) / tag / f"rng_rank{rank}.pt"
        restore_rng_state(torch.load(rng_path, map_location="cpu", weights_only=False))
    return dict(client_state or {})
