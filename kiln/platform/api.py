"""Python API behind the CLI: run a recipe as a job in its run directory.

Each job writes its resolved recipe and a `status.json` (running -> completed / stopped /
failed, with the error) so `kiln runs` can tell what happened, and starts or joins Ray as
the recipe's `ray` section says.

A `run_dir` on object storage (``s3://...``) is written through a local staging folder
(`kiln.storage.staging_dir`): curation writes its steps and shards to the URL directly,
training's checkpoints are copied up as each one completes (`kiln.training.remote_run`),
the status while the job runs (`kiln.platform.runs.heartbeat`), and the rest of the run dir
(recipe, status, metrics, logs, eval) when the job ends.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from pydantic import BaseModel

from kiln import storage
from kiln.console import say
from kiln.data_curation.config import CurationConfig
from kiln.environ import scoped_env
from kiln.liveness import identity
from kiln.metrics import TensorBoardLog, write_metrics
from kiln.models.checkpoint_index import latest_checkpoint, step_of_tag, tag_for_step
from kiln.platform import logs
from kiln.platform.preflight import check_resources, preflight
from kiln.platform.ray_cluster import ray_session
from kiln.platform.recipes import (
    CurateRecipe,
    EvalRecipe,
    RecipeError,
    TrainRecipe,
    apply_overrides,
    dump_recipe,
    load_recipe,
    parse_recipe,
    recipe_hash,
    resolve_paths,
)
from kiln.platform.runs import heartbeat, read_status, write_status
from kiln.platform.summary import curation_step_records, eval_record
from kiln.training.config import TrainConfig
from kiln.training.remote_run import RUN_URL_ENV, push_node_logs

if TYPE_CHECKING:
    from kiln.training.torchrun import RankEnv

M = TypeVar("M", bound=BaseModel)
J = TypeVar("J", CurateRecipe, TrainRecipe, EvalRecipe)

__all__ = [
    "check_resources",
    "curate",
    "dry_run",
    "eval_run_dir",
    "export",
    "resolve_model_file",
    "resume_run",
    "run_curate",
    "run_eval",
    "run_job",
    "run_recipe",
    "run_train",
    "train",
]


def _as(model: BaseModel, cls: type[M]) -> M:
    """The `cls` part of a recipe (a recipe is its job fields plus a config), as a plain `cls`."""
    return cls.model_validate(model.model_dump(include=set(cls.model_fields)))


def local_run_dir(run_dir: str) -> Path:
    """The folder a job writes to: `run_dir` itself, or for a run dir on object storage its
    local staging folder (never a relative folder named ``s3:``)."""
    return Path(storage.staging_dir(run_dir) if storage.is_remote(run_dir) else run_dir)


def _heartbeat(recipe: CurateRecipe | TrainRecipe | EvalRecipe, run: Path) -> Any:
    """The job's heartbeat in `run` (`kiln.platform.runs.heartbeat`); a run dir on object
    storage gets its status.json copied up while the job runs."""
    return heartbeat(run, mirror=recipe.run_dir if storage.is_remote(recipe.run_dir) else None)


def _push(recipe: CurateRecipe | TrainRecipe | EvalRecipe, run: Path) -> None:
    """Copy the staging folder of a run dir on object storage up to it (not checkpoints:
    those went up as each completed)."""
    if storage.is_remote(recipe.run_dir):
        from kiln.training.remote_run import push_run_files

        push_run_files(run, recipe.run_dir)


def _start(recipe: J, *, lead: bool = True, **fields: Any) -> tuple[J, Path]:
    """Resolve the recipe's paths, create its run dir, record the recipe and a `running`
    status; returns the resolved recipe and the (local) run dir. `lead=False` (every rank
    but 0 of a torchrun world, each of which runs this) only resolves the paths."""
    recipe = resolve_paths(recipe)
    run = local_run_dir(recipe.run_dir)
    if not lead:
        return recipe, run
    storage.check_access(recipe.run_dir, write=True)
    try:
        run.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, run / "recipe.yaml")
        # the CLI's library logs: RUN/logs/ from here on
        logs.attach_run(run, shown_as=recipe.run_dir if storage.is_remote(recipe.run_dir) else None)
    except (FileExistsError, NotADirectoryError) as e:
        raise RecipeError(
            f"run_dir {str(run)!r} cannot be a folder: {e.filename or run} is a file; "
            "choose another run_dir"
        ) from e
    except OSError as e:
        raise RecipeError(
            f"run_dir {str(run)!r} cannot be written ({e.strerror}): choose a writable "
            "run_dir (--set run_dir=...)"
        ) from e
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    previous: dict[str, Any] = read_status(run) if fields.get("resumed") else {}
    attempt = {"started": now, "pid": os.getpid(), "host": socket.gethostname()}
    write_status(
        run,
        "running",
        driver=identity(),  # with the heartbeat, how `kiln runs` tells a dead run
        kind=recipe.kind,
        name=recipe.name,
        recipe_hash=recipe_hash(recipe),
        started=previous.get("started") or now,  # a resume continues the run it resumes
        attempts=[*previous.get("attempts", []), attempt],
        error=None,
        traceback=None,
        **fields,
    )
    return recipe, run


def _report(
    run: Path,
    records: list[dict[str, Any]] | None = None,
    eval_result: dict[str, Any] | None = None,
) -> None:
    """A finished job's last outputs: its metrics `records` (a job that knows them only at
    the end: curation, evaluation), a training run's end-of-training evaluation as
    TensorBoard scalars (`eval/...` at the checkpoint's step; its metrics.jsonl keeps one
    record per training step), then `report.html` (`kiln report`). Any of it failing is
    said, and does not fail the job, whose results are already on disk."""
    from kiln.platform.report import write_run_report

    try:
        if records is not None:
            write_metrics(str(run), records)
        if eval_result:
            with TensorBoardLog(str(run)) as tb:
                tb.add(eval_record(eval_result))
        write_run_report(str(run))
    except Exception as e:
        say(
            f"could not write the metrics or report.html of {run} ({type(e).__name__}: {e}): "
            f"the run's results are complete; retry the report with `kiln report {run}`"
        )


def _failed(run: Path, exc: BaseException) -> None:
    """Record how a job ended early: `interrupted` for Ctrl-C / a stop signal (nothing is
    wrong; `kiln resume` continues a train run), `failed` with the error otherwise."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        kind = read_status(run).get("kind")
        hint = f"; resume with `kiln resume {run}`" if kind == "train" else ""
        write_status(run, "interrupted", error=f"interrupted ({type(exc).__name__}){hint}")
        return
    write_status(
        run,
        "failed",
        error=f"{type(exc).__name__}: {exc}",
        traceback=traceback.format_exc(limit=20),
    )


def run_curate(recipe: CurateRecipe, *, fresh: bool = False) -> Any:
    """Curate the recipe's pool into WebDataset shards; returns the CurationResult.
    `fresh` redoes every step instead of reusing the finished ones."""
    from kiln.data_curation import run_curation
    from kiln.data_curation.runner import executor_kind

    _, inputs = preflight(resolve_paths(recipe))  # before Ray starts or anything is written
    recipe, run = _start(recipe)
    cfg = _as(recipe, CurationConfig)
    on_ray = executor_kind(cfg, address=recipe.ray.address)
    try:
        # curation uses no State API: an embedded Ray without its dashboard starts faster
        ray_ctx = (
            ray_session(recipe.ray.address, num_cpus=recipe.ray.num_cpus, dashboard=False)
            if on_ray == "ray"
            else contextlib.nullcontext()
        )
        with ray_ctx, _heartbeat(recipe, run):
            result = run_curation(
                cfg,
                recipe.run_dir if storage.is_remote(recipe.run_dir) else str(run),
                name=recipe.name,
                recipe=recipe.model_dump(mode="json"),
                fresh=fresh,
                inputs=inputs,
            )
    except BaseException as e:
        _failed(run, e)
        _push(recipe, run)
        raise
    write_status(run, "completed", **result.model_dump(mode="json"))
    _report(run, curation_step_records(result.model_dump(mode="json")))
    _push(recipe, run)
    return result


def resolve_model_file(checkpoint: str) -> Path:
    """A weights file for a train run dir (its latest complete checkpoint), a checkpoint
    folder, or a file: the checkpoint's model.pt, or its export when it has none. On object
    storage: a weights file, or a run dir's latest complete checkpoint's model.pt,
    downloaded to the URL's staging folder."""
    from kiln.training.export import resolve_weights

    if storage.is_remote(checkpoint):
        return _download_weights(checkpoint)
    return resolve_weights(checkpoint)


def _download_weights(url: str) -> Path:
    from kiln.models.checkpoint_index import COMPLETE_MARKER
    from kiln.training.remote_run import remote_latest

    storage.check_access(url)
    staging = local_run_dir(url)
    if url.endswith((".pt", ".safetensors")):
        target = staging / url.rstrip("/").rsplit("/", 1)[-1]
        storage.download(url, target)
        return target
    tag = remote_latest(url)
    if tag is None:
        raise FileNotFoundError(
            f"{url!r} holds no complete checkpoint: give a train run dir, or a model.pt or "
            ".safetensors file"
        )
    remote_tag = f"{url.rstrip('/')}/checkpoints/{tag}"
    if not storage.exists(f"{remote_tag}/model.pt"):
        raise FileNotFoundError(
            f"checkpoint {remote_tag} has no model.pt (a large model's checkpoints hold only "
            f"DeepSpeed's shards): run `kiln export {url}` on a machine that can read it and "
            "give its .safetensors file"
        )
    for name in (COMPLETE_MARKER, "model.pt"):
        storage.download(f"{remote_tag}/{name}", staging / "checkpoints" / tag / name)
    (staging / "checkpoints" / "latest").write_text(tag + "\n")
    from kiln.training.export import resolve_weights

    return resolve_weights(str(staging))


def export(run_dir: str, out: str | None, *, step: int | None, fmt: str) -> Path:
    """`kiln export`: the full weights of a run's checkpoint as one file; returns its path
    (default: `{run_dir}/exports/{tag}.{fmt}`)."""
    from kiln.training.export import EXPORTS_DIR, export_model

    source, tag = run_dir, tag_for_step(step) if step is not None else None
    if storage.is_remote(run_dir):  # DeepSpeed's files are read from a local copy
        from kiln.training.remote_run import pull_run

        storage.check_access(run_dir)
        source = str(local_run_dir(run_dir))
        tag = pull_run(run_dir, source, resume=True, tag=tag)
        if tag is None:
            raise FileNotFoundError(f"{run_dir!r} holds no complete checkpoint to export")
    tag = tag or latest_checkpoint(source)
    target = out or f"{run_dir.rstrip('/')}/{EXPORTS_DIR}/{tag}.{fmt}"
    at = step_of_tag(tag) if tag else step
    if not storage.is_remote(target):
        return export_model(source, target, step=at, fmt=fmt)  # type: ignore[arg-type]
    storage.check_access(target.rstrip("/").rsplit("/", 1)[0], write=True)  # its folder
    local = local_run_dir(target) / target.rstrip("/").rsplit("/", 1)[-1]
    export_model(source, local, step=at, fmt=fmt)  # type: ignore[arg-type]
    storage.upload(local, target)
    return local


def _evaluate_into(model_file: Path, cfg: Any, out_dir: Path) -> dict[str, Any]:
    from kiln.training.evaluate import evaluate

    sets = [
        f"{what} on {where}"
        for what, where in (("zero-shot", cfg.zero_shot), ("retrieval", cfg.retrieval))
        if where
    ]
    say(f"evaluating {model_file} ({', '.join(sets)})")
    started = time.perf_counter()
    result = evaluate(str(model_file), cfg, str(out_dir / "eval.json"))
    say(f"evaluation done in {time.perf_counter() - started:.0f}s: {out_dir / 'eval.json'}")
    return result


def run_train(recipe: TrainRecipe, *, resume: bool = False) -> Any:
    """Train (or resume) the recipe's model; evaluates at the end when `eval` names data.

    With `resources.launcher: torchrun` every process of the world runs this; rank 0 alone
    writes the run dir's recipe and status and evaluates, and `resources.workers` is the
    world size torchrun / srun set.
    """
    from kiln.training import train

    lead, ranks = True, None
    if recipe.resources.launcher == "torchrun":
        from kiln.training.torchrun import rank_env

        ranks = rank_env()  # a clear error outside torchrun / srun
        lead = ranks.rank == 0
        resources = recipe.resources.model_copy(update={"workers": ranks.world_size})
        recipe = recipe.model_copy(update={"resources": resources})
    url = recipe.run_dir if storage.is_remote(recipe.run_dir) else None
    checked = recipe
    if url is not None:
        checked = _stage_remote_run(recipe, url, resume=resume, ranks=ranks)
    preflight(resolve_paths(checked), resume=resume)  # before Ray starts or anything is written
    recipe, run = _start(recipe, lead=lead, max_steps=recipe.max_steps, resumed=resume)
    res = recipe.resources
    try:
        # the local launcher runs ranks as plain processes: no Ray needed
        ray_ctx = (
            ray_session(recipe.ray.address, num_cpus=recipe.ray.num_cpus)
            if res.launcher == "ray"
            else contextlib.nullcontext()
        )
        if logs.is_configured():  # DeepSpeed adds its own stdout handler when imported
            from kiln.training.engine import import_deepspeed

            import_deepspeed()
            logs.capture_library_loggers()
        beat = _heartbeat(recipe, run) if lead else contextlib.nullcontext()
        # the ranks started in this block learn which remote run dir their staging mirrors
        mirror = scoped_env(RUN_URL_ENV, url) if url else contextlib.nullcontext()
        with beat, ray_ctx, mirror:
            summary = train(
                _as(recipe, TrainConfig),
                str(run),
                num_workers=res.workers,
                cpus_per_worker=res.cpus_per_worker,
                gpus_per_worker=res.gpus_per_worker,
                launcher=res.launcher,
                resume=resume,
                # stopping early or resuming does not change what is trained
                recipe_hash=recipe_hash(recipe.model_copy(update={"stop_after_step": None})),
                max_restarts=res.max_restarts,
                placement=res.placement,
                checked=True,
                start_timeout_s=res.start_timeout_s,
                bind_cores=res.bind_cores,
            )
        finished = summary.last_step >= recipe.max_steps
        eval_result = None
        if lead and finished and (recipe.eval.zero_shot or recipe.eval.retrieval):
            with _heartbeat(recipe, run):
                eval_result = _evaluate_into(resolve_model_file(str(run)), recipe.eval, run)
    except BaseException as e:
        if lead:
            _failed(run, e)
            _push(recipe, run)
        elif url is not None and ranks is not None and ranks.local_rank == 0:
            push_node_logs(run, url)
        raise
    if lead:
        write_status(
            run,
            "completed" if finished else "stopped",
            last_step=summary.last_step,
            restarts=summary.restarts,
            eval=eval_result,
        )
        _report(run, eval_result=eval_result)
        _push(recipe, run)
    elif url is not None and ranks is not None and ranks.local_rank == 0:
        push_node_logs(run, url)  # this node's rank logs (rank 0's node pushes the rest)
    return summary.model_copy(update={"eval": eval_result}) if eval_result else summary


def _stage_remote_run(
    recipe: TrainRecipe, url: str, *, resume: bool, ranks: RankEnv | None = None
) -> TrainRecipe:
    """Prepare the staging folder of train run dir `url` (a resume downloads its newest
    complete checkpoint, metrics and status); returns the recipe bound to that folder,
    for the checks that read it.

    Under torchrun / srun (`ranks`) every process runs this: each node's first rank
    prepares its node's folder (a resume downloads on every node; a world its starter
    restarted resumes, as `run_rank` does for a local run dir), the other ranks only bind
    to it. They read it once the process group is up, which no rank joins before its
    node's first rank is done here."""
    from kiln.training.remote_run import mark_node_staging, pull_run, remote_latest

    staging = local_run_dir(url)
    bound = recipe.model_copy(update={"run_dir": str(staging)})
    if ranks is not None and ranks.local_rank != 0:
        return bound
    storage.check_access(url, write=True)
    staging.mkdir(parents=True, exist_ok=True)
    restarted = ranks is not None and ranks.restarts > 0 and remote_latest(url) is not None
    pull_run(url, staging, resume=resume or restarted)
    if ranks is not None:  # checked once every node has staged (`run_rank`)
        mark_node_staging(staging, ranks.rank)
    if ranks is None or ranks.rank == 0:  # the run's status is the lead's to write
        (staging / "status.json").unlink(missing_ok=True)
        if resume and storage.exists(f"{url.rstrip('/')}/status.json"):
            storage.download(f"{url.rstrip('/')}/status.json", staging / "status.json")
    return bound


def _train_run_recipe(run_dir: str, overrides: list[str], not_train: str) -> TrainRecipe:
    """The recorded recipe of a train run dir (with `overrides`), bound to that dir."""
    recipe_file = f"{run_dir.rstrip('/')}/recipe.yaml"
    storage.check_access(run_dir)
    text = storage.read_text(recipe_file) if storage.is_remote(run_dir) else None
    if text is None and not (not storage.is_remote(run_dir) and Path(recipe_file).is_file()):
        raise RecipeError(
            f"{run_dir!r} is not a kiln run dir (no recipe.yaml): give the folder a "
            "`kiln train` run wrote"
        )
    data = yaml.safe_load(text if text is not None else Path(recipe_file).read_text())
    if not isinstance(data, dict) or data.get("kind") != "train":
        raise RecipeError(f"{recipe_file}: {not_train}")
    data["run_dir"] = str(run_dir)
    recipe = parse_recipe(apply_overrides(data, overrides), source=str(recipe_file))
    assert isinstance(recipe, TrainRecipe)
    return recipe


def resume_run(run_dir: str, overrides: list[str] | None = None) -> Any:
    """Continue a train run from its latest complete checkpoint to `max_steps`.

    `stop_after_step` of the original invocation is cleared unless an override sets it again.
    A run already at `max_steps` is not relaunched: the message saying so is returned.
    """
    recipe = _train_run_recipe(
        run_dir, ["stop_after_step=null", *(overrides or [])], "only train runs can be resumed"
    )
    if storage.is_remote(run_dir):
        from kiln.training.remote_run import remote_latest

        tag = remote_latest(run_dir)
    else:
        tag = latest_checkpoint(run_dir)
    step = step_of_tag(tag) if tag else None
    if step is not None and step >= recipe.max_steps and recipe.stop_after_step is None:
        return (
            f"{run_dir} is complete at step {step} (max_steps {recipe.max_steps}): nothing "
            "to resume; pass --set max_steps=N to train further"
        )
    return run_train(recipe, resume=True)


def run_eval(recipe: EvalRecipe) -> dict[str, Any]:
    """Evaluate a checkpoint; writes `eval.json` into the eval run dir."""
    preflight(resolve_paths(recipe))
    recipe, run = _start(recipe)
    try:
        with _heartbeat(recipe, run):
            result = _evaluate_into(resolve_model_file(recipe.checkpoint), recipe.eval, run)
    except BaseException as e:
        _failed(run, e)
        _push(recipe, run)
        raise
    write_status(run, "completed", eval=result)
    _report(run, [eval_record(result)])
    _push(recipe, run)
    return result


def eval_run_dir(
    run_dir: str, overrides: list[str] | None = None, *, check_only: bool = False
) -> Any:
    """Evaluate a train run's latest checkpoint with the `eval` section of its recipe
    (`check_only`: `--dry-run`, returning what `dry_run` returns)."""
    train = _train_run_recipe(run_dir, overrides or [], "`kiln eval RUN_DIR` takes a train run")
    recipe_file = f"{run_dir.rstrip('/')}/recipe.yaml"
    if not (train.eval.zero_shot or train.eval.retrieval):
        raise RecipeError(
            f"{recipe_file}: its eval section names no data: pass "
            "--set eval.zero_shot=EVAL_DIR or --set eval.retrieval=DATASET_DIR"
        )
    if check_only:
        as_eval = EvalRecipe(
            kind="eval", name=train.name, run_dir=run_dir, checkpoint=run_dir, eval=train.eval
        )
        return dry_run(as_eval)
    run = local_run_dir(run_dir)
    logs.attach_run(run, shown_as=run_dir if storage.is_remote(run_dir) else None)
    result = _evaluate_into(resolve_model_file(run_dir), train.eval, run)
    _report(run, eval_result=result)
    _push(train, run)
    return result


def dry_run(recipe: CurateRecipe | TrainRecipe | EvalRecipe) -> list[str]:
    """`--dry-run`: every check the job makes before it starts Ray (`preflight`), and
    nothing else: no Ray, nothing written. Returns what the job would do, line by line;
    raises the first problem."""
    lines, _ = preflight(resolve_paths(recipe), generate=False)
    return lines


def run_job(
    recipe: CurateRecipe | TrainRecipe | EvalRecipe, *, resume: bool = False, fresh: bool = False
) -> Any:
    """Run a loaded recipe as its `kind` says (`fresh`: a curation redoes every step)."""
    if isinstance(recipe, CurateRecipe):
        return run_curate(recipe, fresh=fresh)
    if isinstance(recipe, TrainRecipe):
        return run_train(recipe, resume=resume)
    return run_eval(recipe)


def run_recipe(path: str, overrides: list[str] | None = None, *, resume: bool = False) -> Any:
    """Load a recipe file and run it."""
    return run_job(load_recipe(path, overrides), resume=resume)


def _recipe_of(
    recipe: str | Path | dict[str, Any] | CurateRecipe | TrainRecipe | EvalRecipe,
    overrides: list[str] | None,
    kind: str,
) -> Any:
    if isinstance(recipe, (str, Path)):
        loaded = load_recipe(recipe, overrides)
    elif isinstance(recipe, dict):
        loaded = parse_recipe(apply_overrides(recipe, overrides or []))
    else:
        loaded = parse_recipe(
            apply_overrides(recipe.model_dump(mode="json"), overrides or []), source=recipe.name
        )
    if loaded.kind != kind:
        raise RecipeError(
            f"this is a `kind: {loaded.kind}` recipe: run it with kiln.{loaded.kind}(...)"
        )
    return loaded


def curate(
    recipe: str | Path | dict[str, Any] | CurateRecipe, overrides: list[str] | None = None
) -> Any:
    """`kiln curate` from Python: a recipe file, dict or object (plus `a.b=c` overrides)
    -> its CurationResult (counts per step and drop reason, the dataset's folder)."""
    return run_curate(_recipe_of(recipe, overrides, "curate"))


def train(
    recipe: str | Path | dict[str, Any] | TrainRecipe,
    overrides: list[str] | None = None,
    *,
    resume: bool = False,
) -> Any:
    """`kiln train` (or, with `resume`, `kiln resume`) from Python -> its TrainSummary."""
    return run_train(_recipe_of(recipe, overrides, "train"), resume=resume)
