"""What a job checks before it starts Ray or writes anything, for the run and `--dry-run`.

`preflight(recipe)` is called by `kiln.platform.api` before each job starts Ray (and before
it creates the run dir), and alone by `kiln train/curate/eval --dry-run`: one set of
checks, so a dry run passes exactly when the real command would get past its start.

- curate: the input paths name files, `input.image_dir` is a folder, each stage's own
  check (entries files...) passes (`kiln.data_curation.runner.check_curation`); a
  synthetic pool not generated yet is reported, not generated, by a dry run;
- train: the dataset's manifest is readable and holds a global batch, captions are there
  for an objective that reads them, a resume matches its checkpoint, a fresh run does not
  land on a run's checkpoints (`kiln.training.preflight.preflight`);
- eval: the checkpoint resolves to weights, the eval sets are readable
  (`kiln.training.evaluate.check_eval_sets`);
- every kind: the run dir can be created, and the resources fit the machine (an embedded
  Ray with fewer CPUs than the job's workers ask would wait forever; GPUs asked of a
  machine that has none likewise).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from kiln import storage
from kiln.platform.recipes import CurateRecipe, EvalRecipe, RecipeError, TrainRecipe

__all__ = ["check_resources", "preflight", "ray_cpus"]


def ray_cpus(recipe: CurateRecipe | TrainRecipe | EvalRecipe) -> float | None:
    """CPUs of the Ray the job will run on: the one this process is connected to, else the
    embedded one it would start (`ray.num_cpus`, default all); None for a cluster address
    (not known before connecting)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return float(ray.cluster_resources().get("CPU", 0))
    if recipe.ray.address:
        return None
    return float(recipe.ray.num_cpus or os.cpu_count() or 1)


def check_resources(recipe: CurateRecipe | TrainRecipe) -> None:
    """Refuse resource settings the Ray the recipe will start can never satisfy
    (`kiln.resource_fit`): Ray Train workers or a stage's actor pool needing more CPUs
    than ``ray.num_cpus`` (or this machine) gives. Starts nothing, so it runs before Ray
    does (and in a dry run); with a cluster address the check waits for the live cluster."""
    from kiln.resource_fit import check_plan_fits, check_train_fits, embedded_capacity

    if recipe.ray.address is not None:
        return
    capacity = embedded_capacity(recipe.ray.num_cpus)
    if isinstance(recipe, TrainRecipe):
        res = recipe.resources
        if res.launcher == "ray":
            check_train_fits(
                res.workers, res.cpus_per_worker, res.gpus_per_worker, res.placement, capacity
            )
        return
    from kiln.data_curation.config import CurationConfig
    from kiln.data_curation.runner import executor_kind

    cfg = CurationConfig.model_validate(recipe.model_dump(include=set(CurationConfig.model_fields)))
    if executor_kind(cfg, address=None) == "ray":
        check_plan_fits(((s.name, s.resources) for s in cfg.plan()), capacity)


def _check_run_dir(run_dir: str) -> None:
    """The run dir is a folder or can be made one (its nearest existing parent is a
    writable folder): the same refusal `api` gives when it creates it, without creating.
    On object storage: its bucket answers and takes writes (`kiln.storage.check_access`)."""
    if storage.is_remote(run_dir):
        storage.check_access(run_dir, write=True)
        return
    path = Path(run_dir)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise RecipeError(
            f"run_dir {run_dir!r} cannot be a folder: {existing} is a file; choose another run_dir"
        )
    if existing is None or not os.access(existing, os.W_OK):
        raise RecipeError(
            f"run_dir {run_dir!r} cannot be created ({existing} is not a writable folder): "
            "choose a writable run_dir (--set run_dir=...)"
        )


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _check_train_resources(recipe: TrainRecipe) -> str:
    res = recipe.resources
    cpus = res.workers * res.cpus_per_worker
    line = f"{res.workers} ranks ({res.launcher}), {res.cpus_per_worker:g} CPUs each"
    if res.launcher == "ray":
        have = ray_cpus(recipe)
        if have is not None:
            line += f" of the {have:g} CPUs of Ray"
    elif res.launcher == "local" and cpus > (os.cpu_count() or 1):
        line += f" (more than this machine's {os.cpu_count()} CPUs: the ranks will share)"
    if res.gpus_per_worker > 0 and res.launcher != "torchrun" and not recipe.ray.address:
        have_gpus = _gpus()
        want = res.workers * res.gpus_per_worker
        if want > have_gpus:
            raise RecipeError(
                f"resources.workers={res.workers} x resources.gpus_per_worker="
                f"{res.gpus_per_worker:g} = {want:g} GPUs, but this machine has {have_gpus}: "
                "lower them (resources.gpus_per_worker=0 trains on CPU)"
            )
        line += f", {res.gpus_per_worker:g} GPUs each"
    return line


def _curate(recipe: CurateRecipe, generate: bool) -> tuple[list[str], Any]:
    from kiln.data_curation.config import CurationConfig
    from kiln.data_curation.plan import step_names
    from kiln.data_curation.runner import check_curation, executor_kind
    from kiln.resource_fit import usable_cpus

    cfg = CurationConfig.model_validate(recipe.model_dump(include=set(CurationConfig.model_fields)))
    plan = cfg.plan()
    where = executor_kind(cfg, plan, address=recipe.ray.address)
    lines = [f"plan: {' -> '.join(step_names(plan))}"]
    if where == "ray":
        have = ray_cpus(recipe)
        lines.append(
            "executor: ray"
            + (f" ({have:g} CPUs)" if have is not None else f" at {recipe.ray.address}")
        )
    else:
        workers = cfg.execution.workers or usable_cpus()
        lines.append(f"executor: local ({workers} worker processes)")
    inputs = check_curation(cfg, generate=generate)
    if inputs.pending_pool is not None:
        n = cfg.input.synthetic.num_samples
        lines.append(f"input: a synthetic pool of {n} rows, generated into {inputs.pending_pool}")
    else:
        lines.append(f"input: {len(inputs.files)} {cfg.input.format} files")
    lines.append(f"dataset: {cfg.shard.output or recipe.run_dir + '/dataset'}")
    return lines, inputs


def _train(recipe: TrainRecipe, resume: bool) -> list[str]:
    from kiln.training.config import TrainConfig
    from kiln.training.preflight import preflight as train_preflight

    lines = [_check_train_resources(recipe)]
    cfg = TrainConfig.model_validate(recipe.model_dump(include=set(TrainConfig.model_fields)))
    # under torchrun each rank checks the run dir once it knows of restarts (launch.train)
    run_dir_check = recipe.resources.launcher != "torchrun"
    if storage.is_remote(recipe.run_dir):  # (`kiln train` checks its staged copy instead)
        from kiln.training.remote_run import complete_remote_checkpoints

        if not resume and complete_remote_checkpoints(recipe.run_dir):
            raise FileExistsError(
                f"run dir {recipe.run_dir!r} already holds checkpoints: resume it (`kiln "
                f"resume {recipe.run_dir}`) or train into a new run_dir"
            )
        run_dir_check = False
    lines.append(
        train_preflight(
            cfg, recipe.resources.workers, recipe.run_dir, resume, run_dir_check=run_dir_check
        )
    )
    lines.append(
        f"model: {recipe.model.flavor} ({recipe.model.arch}), {recipe.max_steps} steps, "
        f"ZeRO-{recipe.zero.stage}"
    )
    return lines


def _eval(recipe: EvalRecipe) -> list[str]:
    from kiln.training.evaluate import check_eval_sets
    from kiln.training.export import locate_weights

    if storage.is_remote(recipe.checkpoint):
        storage.check_access(recipe.checkpoint)
        lines = [f"checkpoint: {recipe.checkpoint} (its weights are downloaded)"]
        return lines + check_eval_sets(recipe.eval)
    weights, export = locate_weights(recipe.checkpoint)
    lines = [f"checkpoint: {weights}" + (" (exported on first use)" if export else "")]
    return lines + check_eval_sets(recipe.eval)


def preflight(
    recipe: CurateRecipe | TrainRecipe | EvalRecipe, *, resume: bool = False, generate: bool = True
) -> tuple[list[str], Any]:
    """Run every check `recipe`'s job makes before it starts Ray; raise the first failure
    (a `RecipeError`, `FileNotFoundError` or `ValueError` naming the fix). Returns a few
    lines saying what the job will do, and what the checks found that the job reuses (a
    curation's `CurationInputs`; None otherwise). `generate=False` (a dry run) writes
    nothing: a synthetic pool is reported, not generated. `resume`: a `kiln resume`."""
    _check_run_dir(recipe.run_dir)
    if not isinstance(recipe, EvalRecipe):
        check_resources(recipe)  # what Ray could never give would wait forever
    if isinstance(recipe, CurateRecipe):
        return _curate(recipe, generate)
    if isinstance(recipe, TrainRecipe):
        return _train(recipe, resume), None
    return _eval(recipe), None
