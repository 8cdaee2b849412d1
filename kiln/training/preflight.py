"""The checks a training run passes before any rank (or Ray) starts.

One function, `preflight`, that `kiln.training.launch.train` runs, that `kiln train` runs
before it starts Ray, and that `kiln train --dry-run` runs alone: a missing or too small
dataset, captions missing for an objective that reads them, a resume with another model
or ZeRO stage, a fresh run on top of a run's checkpoints. The dataset's manifest is read
first and without torch, so a wrong `data.dataset` is reported within a second or two.
"""

from __future__ import annotations

from pathlib import Path

from kiln.contracts import read_manifest
from kiln.training.config import TrainConfig

__all__ = ["preflight"]


def preflight(
    cfg: TrainConfig,
    world: int,
    run: str | Path,
    resume: bool,
    *,
    run_dir_check: bool = True,
    verify: bool = True,
) -> str:
    """Fail in the caller, not in `world` ranks, when the dataset is missing, too small,
    damaged (a shard's sha256 is not the manifest's; `verify` and ``data.verify_shards``),
    or has no captions for an objective that reads them, when the checkpoint to resume was
    trained with another model or ZeRO stage, or (`run_dir_check`) when a fresh run would
    start on top of `run`'s checkpoints. Returns a one-line description of the data."""
    manifest = read_manifest(cfg.data.dataset)  # before torch is imported: fails fast
    from kiln.training.checkpoint import check_resumable, resume_checkpoint
    from kiln.training.data import WebDatasetLoader, dataset_has_text
    from kiln.training.loop import _log, check_run_dir
    from kiln.training.shard_check import verify_shards

    run = Path(run)
    if run_dir_check:
        check_run_dir(run, resume)
    tag = resume_checkpoint(run)[0] if resume else None
    if tag is not None:
        check_resumable(run, tag, zero_stage=cfg.zero.stage, model=cfg.model)
    loader = WebDatasetLoader.from_config(cfg, world_size=world)
    if verify and cfg.data.verify_shards:
        verify_shards(loader.dataset, loader.manifest, log=lambda m: _log(0, m))
    objective = cfg.objective.name if cfg.objective is not None else cfg.model.arch
    if cfg.model.needs_text and not dataset_has_text(loader.dataset):
        raise ValueError(
            f"objective {objective!r} trains on captions but dataset {cfg.data.dataset!r} has "
            "no text (its samples have no {uid}.txt member): train an image-only objective "
            "on it (e.g. model.flavor=mae-tiny) or point data.dataset at an image-text dataset"
        )
    return (
        f"dataset {cfg.data.dataset}: {manifest.num_samples} samples in "
        f"{len(manifest.shards)} shards, {loader.steps_per_epoch} steps per epoch at "
        f"{world} x {cfg.data.batch_size}" + (f"; resumes from {tag}" if tag is not None else "")
    )
