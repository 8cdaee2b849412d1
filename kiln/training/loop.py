"""The training loop that runs inside every rank, whichever launcher started it.

`train_worker` seeds, builds the model, the DeepSpeed engine and the loader, resumes from
the latest complete checkpoint when asked, trains to ``cfg.max_steps`` (or stops after
``cfg.stop_after_step``), checkpoints every ``cfg.checkpoint.every_steps`` and at the end,
and appends one record per step to ``{run_dir}/metrics.jsonl`` (rank 0)::

    {"step", "loss", "lr", "epoch", "samples_per_s", "elapsed_s", "attempt", "resumed_from",
     "step_s", "data_wait_s", "grad_norm", "rss_mb", ("cuda_max_allocated_mb" on a GPU),
     ...the objective's logged scalars (e.g. "logit_scale", "caption_loss")}

and writes the same scalars to TensorBoard event files in ``{run_dir}/tensorboard/``
(`kiln.metrics`). ``data_wait_s`` is the time the step waited for its batches (a loader
that cannot keep up shows here; with the loader workers in the rank's process,
``data.worker_processes``, it is the time the rank spent making them), ``grad_norm``
the global gradient 2-norm before clipping.
The step line (``[kiln] step 120/400  61.3 samples/s  loss 2.3100  lr 0.001  ETA 1m20s``)
is printed at the first and last step and every ``log_every`` steps, at most every
``STEP_LINE_EVERY_S`` seconds.

The loop is objective-agnostic: the run's objective (`kiln.training.objectives`) says which
batch fields it reads and turns the model's outputs into the loss.

``loss`` is the global-batch loss (the mean of the ranks' losses) as a Python float, which
JSON round-trips exactly, so runs can be compared bitwise from their metrics files.

Fault injection, for tests of crash recovery (environment variables, off by default):

- ``KILN_FAULT_SIGKILL_AFTER_STEP=N``: after step N is done (and its checkpoint, if one is
  due), every rank SIGKILLs itself.
- ``KILN_FAULT_SIGKILL_IN_SAVE=N``: every rank SIGKILLs itself in the middle of saving the
  checkpoint of step N: after DeepSpeed, RNG and model files are written, before the
  COMPLETE marker and ``latest``.
- ``KILN_FAULT_SIGKILL_RANK=R@N`` (or several, ``R@N,R@M``): after step N is done (and its
  checkpoint), rank R alone SIGKILLs itself, once per run dir: it first writes
  ``{run_dir}/.fault-sigkill-rankR-stepN`` and does not fire when that file exists, so a
  restarted attempt passes step N (tests of self-healing restarts).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kiln import storage
from kiln.console import say
from kiln.metrics import METRICS_FILE, TensorBoardLog, memory_stats, read_metrics
from kiln.training.checkpoint import (
    changed_fields,
    latest_checkpoint,
    load_checkpoint,
    prepare_resume,
    resume_checkpoint,
    save_checkpoint,
    saved_param_alignment,
    seed_everything,
    set_aside_damaged,
)
from kiln.training.config import TrainConfig
from kiln.training.cpu_binding import bind_rank, loader_in_rank
from kiln.training.data import Batch, WebDatasetLoader
from kiln.training.engine import (
    align_params,
    build_ds_config,
    build_engine,
    import_deepspeed,
    init_distributed,
    use_bf16,
)
from kiln.training.host_memory import holds_on_this_thread, keep_freed_memory
from kiln.training.remote_run import RUN_URL_ENV

__all__ = [
    "FAULT_SIGKILL_AFTER_STEP",
    "FAULT_SIGKILL_IN_SAVE",
    "FAULT_SIGKILL_RANK",
    "LOADER_BOUND_SHARE",
    "METRICS_FILE",
    "STEP_LINE_EVERY_S",
    "SUMMARY_FILE",
    "check_run_dir",
    "format_duration",
    "loader_bound_hint",
    "train_worker",
    "wants_model_file",
]

FAULT_SIGKILL_AFTER_STEP = "KILN_FAULT_SIGKILL_AFTER_STEP"
FAULT_SIGKILL_IN_SAVE = "KILN_FAULT_SIGKILL_IN_SAVE"
FAULT_SIGKILL_RANK = "KILN_FAULT_SIGKILL_RANK"
#: the step line is printed at most this often (the first and the last step always)
STEP_LINE_EVERY_S = 5.0
_LOSS = "\x00loss"  # the loss's key among the logged scalars (no objective's name)
SUMMARY_FILE = "train_summary.json"
#: rank 0 waiting for batches this share of its step time or more: `loader_bound_hint` says
#: how to feed the run faster
LOADER_BOUND_SHARE = 0.2


def loader_bound_hint(waits: list[float], step_times: list[float], *, in_rank: bool) -> str | None:
    """What to change when a run's loader held it back: rank 0 waited for its batches
    (`waits`, seconds a step) `LOADER_BOUND_SHARE` or more of its step time after the first
    step (which waits for the loader workers to start). None when it did not, over fewer
    than 3 steps, or with the loader in the rank's process, whose wait is its loading work
    (its cores are full: more workers would not help)."""
    if in_rank or len(step_times) < 3:
        return None
    wait, total = sum(waits[1:]), sum(step_times[1:])
    if total <= 0 or wait < LOADER_BOUND_SHARE * total:
        return None
    return (
        f"the loader held this run back: rank 0 waited for its batches {wait / total:.0%} "
        "of its step time. Next run: more loader workers per rank (data.num_workers, with "
        "the CPUs to run them; it also sets the sample order), or JPEGs decoded at reduced "
        "size (data.fast_decode: true: about 2.2x the samples per CPU-second on web photos "
        "at 224 px, with pixels that differ from the full-size decode's)"
    )


def wants_model_file(cfg: TrainConfig) -> bool:
    """Whether each checkpoint also holds a consolidated ``model.pt`` (see
    `CheckpointConfig.model_file`)."""
    mode = cfg.checkpoint.model_file
    if mode != "auto":
        return mode == "always"
    from kiln.models.build import count_parameters

    return count_parameters(cfg.model)["total"] <= cfg.checkpoint.model_file_max_params


def _fault_step(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"{name}={value!r} must be a step number (or unset)") from e


def _fault_rank_steps() -> set[tuple[int, int]]:
    value = os.environ.get(FAULT_SIGKILL_RANK, "").strip()
    points = set()
    for item in value.split(",") if value else []:
        rank, sep, step = item.strip().partition("@")
        if not (sep and rank.isdigit() and step.isdigit()):
            raise ValueError(
                f"{FAULT_SIGKILL_RANK}={value!r} must be RANK@STEP[,RANK@STEP...], e.g. 1@5 "
                "(or unset)"
            )
        points.add((int(rank), int(step)))
    return points


def _sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _sigkill_once(run: Path, rank: int, step: int) -> None:
    """SIGKILL this process unless an earlier attempt of the run already did at this point."""
    marker = run / f".fault-sigkill-rank{rank}-step{step}"
    if not marker.exists():
        marker.write_text(f"{FAULT_SIGKILL_RANK} fired at {time.strftime('%H:%M:%S')}\n")
        _sigkill_self()


def check_run_dir(run_dir: str | Path, resume: bool) -> None:
    """Refuse to start a fresh run on top of an existing one's checkpoints."""
    if not resume and latest_checkpoint(run_dir) is not None:
        raise FileExistsError(
            f"run dir {run_dir!r} already holds checkpoints: resume it (`kiln resume "
            f"{run_dir}` / resume=True) or train into a new run_dir"
        )


def format_duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``."""
    s = int(max(0.0, seconds) + 0.5)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


def _next_attempt(run: Path) -> int:
    """The number of the attempt starting now in `run`: one more than its metrics' last."""
    last = 0
    for record in read_metrics(str(run)):  # lines torn by a kill are skipped there
        with contextlib.suppress(TypeError, ValueError):
            last = max(last, int(record.get("attempt", 0)))
    return last + 1


def _start_global_means(
    logs: list[dict[str, torch.Tensor]], world: int
) -> Callable[[], dict[str, float]]:
    """Each logged scalar averaged over micro-steps and ranks, by one all-reduce for all of
    them, started now and not waited for: the returned function waits and gives the means.

    Started before the step's backward, the all-reduce runs beside it (on gloo's thread, or
    NCCL's stream) instead of being one more point where every rank waits for the slowest:
    on 2 CPU ranks a collective costs about a millisecond even with no one late.
    """
    names = sorted(logs[0]) if logs else []
    if not names:
        return lambda: {}
    local = torch.stack(
        [torch.stack([m[k].detach().float().reshape(()) for k in names]) for m in logs]
    ).mean(dim=0)
    if world == 1:
        return lambda: dict(zip(names, local.tolist(), strict=True))
    if torch.cuda.is_available() and dist.get_backend() == dist.Backend.NCCL:
        local = local.cuda()
    work = dist.all_reduce(local, op=dist.ReduceOp.SUM, async_op=True)

    def means() -> dict[str, float]:
        assert work is not None
        work.wait()
        return dict(zip(names, (local / world).tolist(), strict=True))

    return means


def _check_batch_rows(batch: Batch, batch_size: int) -> None:
    """Every rank's batch has ``data.batch_size`` samples (kiln's loader drops an epoch's
    tail for it), which lets the global-batch losses skip comparing sizes across ranks;
    checked here, on each rank, for nothing."""
    rows = int(batch.images.shape[0])
    if rows != batch_size:
        raise RuntimeError(
            f"the loader gave this rank a batch of {rows} samples, not data.batch_size="
            f"{batch_size}: a kiln bug (every rank must get equal batches); please report it"
        )


def _grad_norm(module: torch.nn.Module) -> float:
    """Global 2-norm of the module's gradients (ZeRO-0: every rank holds the averaged
    gradients, so the local norm is the global one)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _log(rank: int, msg: str) -> None:
    # Written to the stream, not print(): Ray Train patches print() into its logger, which
    # would show every line twice on the driver. `say` keeps to the terminal while a
    # torchrun rank's library output goes to its log file (kiln.console).
    if rank == 0:
        say(msg)


def _trained_summary(
    run: Path, end: int, samples_per_step: int, base: dict[str, Any]
) -> dict[str, Any] | None:
    """The summary of the last attempt that trained up to step `end` (the run's end), from
    its per-step records in the run's metrics; None when no attempt reached `end`. For an
    attempt with nothing to train (a group restarted after the run had ended: a rank that
    died while shutting down), whose own summary would be empty. `base`: this attempt's
    summary, for the fields the records do not hold."""
    records = read_metrics(str(run))
    if not records or records[-1].get("step") != end:
        return None
    last = records[-1]["attempt"]
    mine = [r for r in records if r.get("attempt") == last]
    step_s = sum(float(r.get("step_s", 0.0)) for r in mine)
    return {
        **base,
        "first_step": mine[0]["step"],
        "last_step": end,
        "losses": [r["loss"] for r in mine],
        "samples_per_s": samples_per_step * len(mine) / step_s if step_s else 0.0,
        "resumed_from": mine[0]["resumed_from"],
        "attempt": last,
        "train_s": step_s,
    }


def _note_recipe_changes(
    rank: int, tag: str, client: dict[str, Any], cfg: TrainConfig, recipe_hash: str
) -> None:
    """Say which training settings a resume changes since checkpoint `tag` (those it may
    change: the model and ZeRO stage were checked before), each as ``key: old -> new``."""
    saved = client.get("train_config")
    if saved is not None:
        changes = changed_fields(saved, cfg.model_dump(mode="json"))
        if changes:
            shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes[:12])
            more = f" and {len(changes) - 12} more" if len(changes) > 12 else ""
            _log(rank, f"note: resuming {tag} with changed settings: {shown}{more}")
        return
    old_hash = client.get("recipe_hash", "")  # a checkpoint of a kiln that kept only the hash
    if recipe_hash and old_hash and old_hash != recipe_hash:
        _log(
            rank,
            f"note: the recipe changed since {tag} (its hash differs; this checkpoint "
            "does not record which settings)",
        )


def train_worker(
    cfg: TrainConfig,
    run_dir: str,
    *,
    resume: bool,
    recipe_hash: str = "",
    num_threads: int | None = None,
    bind_cores: bool = False,
) -> dict[str, Any]:
    """Train in this rank (torch.distributed env set up by a launcher); returns a summary.

    Collective: every rank of the world calls it with the same arguments. `num_threads`
    pins torch's intra-op threads (results can depend on it, so both launchers set it).
    `bind_cores`: this rank computes on cores of its own and its loader workers on the
    cores left over (`kiln.training.cpu_binding`; numerics unchanged).
    """
    # DeepSpeed's ZeRO calls torch collectives torch has renamed; the warnings are not ours.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    if cfg.host_memory == "reuse":
        keep_freed_memory()  # before the model and the engine allocate anything large
    created_group = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if num_threads:
        torch.set_num_threads(num_threads)
    # (before binding, which narrows this process's cores to the rank's own)
    in_rank, why = loader_in_rank(
        cfg.data.worker_processes,
        cfg.data.num_workers,
        torch.get_num_threads(),
        cpu_ranks=not torch.cuda.is_available(),  # a GPU rank's device (`engine`)
    )
    binding = None
    if bind_cores:
        binding, line = bind_rank(torch.get_num_threads())
        _log(rank, line)
    if why is not None:
        _log(rank, why)
    if cfg.host_memory == "reuse" and not holds_on_this_thread():
        _log(
            rank,
            "host_memory: reuse does not hold on this thread (start the process with "
            "MALLOC_ARENA_MAX=1): large freed blocks are faulted in again every step",
        )
    run = Path(run_dir)
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)

    from kiln.models.build import build_model
    from kiln.training.objectives import build_objective

    assert cfg.objective is not None  # TrainConfig fills in the model family's objective
    # every rank checks its own batches against data.batch_size (below), so they are equal
    objective = build_objective(cfg.objective, equal_batches=True)
    tag = None
    if resume:
        tag, damaged = resume_checkpoint(run)
        for bad, reason in damaged:
            _log(rank, f"skipping damaged checkpoint {bad} ({reason}): set aside as {bad}.damaged")
        if damaged:
            dist.barrier()  # every rank has chosen before rank 0 moves folders
            if rank == 0:
                set_aside_damaged(run, damaged, tag)
            dist.barrier()
    if resume and tag is None:
        _log(
            rank,
            f"resume: no complete checkpoint under {run / 'checkpoints'}; starting from scratch",
        )
    elif not resume:
        check_run_dir(run, resume=False)
    elastic = tag is not None and prepare_resume(
        run, tag, zero_stage=cfg.zero.stage, model=cfg.model, log=lambda m: _log(rank, m)
    )
    aligned = None  # a new run's ZeRO parameter layout: zero.align_params chooses it
    if tag is not None and not elastic:
        aligned = saved_param_alignment(run, tag)  # the layout its optimizer states are in
        if aligned != align_params(cfg):
            _log(
                rank,
                f"resume: {tag} was written with ZeRO parameters "
                f"{'aligned to 16 bytes' if aligned else 'unaligned'} and its optimizer "
                "states are in that layout, so this run keeps it (zero.align_params="
                f"{cfg.zero.align_params} would choose the other; a resume on another number "
                "of ranks takes that one)",
            )
    seed_everything(cfg.seed)  # every rank builds identical initial weights
    if cfg.zero.stage == 3:
        # partitioned as each module is built: no rank ever holds the whole model
        with import_deepspeed().zero.Init(config_dict_or_path=build_ds_config(cfg, world)):
            model = build_model(cfg.model)
    else:
        model = build_model(cfg.model)
    engine = build_engine(
        model, cfg, world, load_universal=elastic and cfg.zero.stage > 0, aligned=aligned
    )
    device = engine.device
    image_dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
    loader = WebDatasetLoader.from_config(
        cfg,
        rank=rank,
        world_size=world,
        with_text=objective.needs_text,
        with_seeds=objective.needs_sample_seeds,
        worker_cpus=binding.loader if binding is not None else None,
        in_rank=in_rank,
        pin_memory=device.type == "cuda",
    )

    step, resumed_from = 0, None
    if tag is not None:
        client = load_checkpoint(engine, run, tag, seed=cfg.seed)["kiln"]
        step = resumed_from = int(client["step"])
        loader.load_state_dict(client["loader"])
        _note_recipe_changes(rank, tag, client, cfg, recipe_hash)
        _log(rank, f"resumed from {tag} (epoch {loader.epoch}, batch {loader.step_in_epoch})")

    metrics_path = run / METRICS_FILE
    attempt = _next_attempt(run) if rank == 0 else 0
    kill_after = _fault_step(FAULT_SIGKILL_AFTER_STEP)
    kill_in_save = _fault_step(FAULT_SIGKILL_IN_SAVE)
    kill_ranks = _fault_rank_steps()
    end = cfg.max_steps if cfg.stop_after_step is None else min(cfg.max_steps, cfg.stop_after_step)
    samples_per_step = cfg.data.batch_size * cfg.optim.grad_accum * world
    first_step = step + 1
    losses: list[float] = []
    step_times: list[float] = []
    data_waits: list[float] = []
    _log(
        rank,
        f"training {cfg.model.flavor} with objective {objective.name}, "
        f"steps {first_step}..{end} of {cfg.max_steps} on {world} rank(s), "
        f"ZeRO-{cfg.zero.stage}, {samples_per_step} samples/step, "
        f"{loader.steps_per_epoch} steps/epoch",
    )

    write_model_file = wants_model_file(cfg)
    mirror = os.environ.get(RUN_URL_ENV) or None  # a run dir on object storage, staged in `run`

    def save(at: int) -> str:
        hook = _sigkill_self if kill_in_save == at else None
        client = {
            "kiln": {
                "step": at,
                "epoch": loader.epoch,
                "loader": loader.state_dict(),
                "recipe_hash": recipe_hash,
                "train_config": cfg.model_dump(mode="json"),  # what a resume compares with
                "world_size": world,
            }
        }
        return save_checkpoint(
            engine,
            run,
            step=at,
            client_state=client,
            model_config=cfg.model,
            keep_last=cfg.checkpoint.keep_last,
            model_file=write_model_file,
            before_commit=hook,
            mirror=mirror,
        )

    t_start = time.perf_counter()
    batches = iter(loader)
    tb = TensorBoardLog(str(run)) if rank == 0 else None
    last_line = float("-inf")
    try:
        while step < end:
            t0 = time.perf_counter()
            lr = float(engine.get_lr()[0])
            micro_logs: list[dict[str, torch.Tensor]] = []
            data_wait = 0.0
            own_norm = None
            for micro in range(cfg.optim.grad_accum):
                t_wait = time.perf_counter()
                batch: Batch = next(batches)
                data_wait += time.perf_counter() - t_wait
                _check_batch_rows(batch, cfg.data.batch_size)
                fields = batch.to(device, image_dtype, objective.batch_fields)
                outputs = engine(**objective.model_inputs(fields))
                if not step_times and not micro_logs:  # first micro-step of this invocation
                    objective.check_outputs(outputs)
                loss, logs = objective.loss(outputs, fields)
                micro_logs.append({**logs, _LOSS: loss.detach().float()})
                if micro == cfg.optim.grad_accum - 1:  # averaged while the step runs
                    means = _start_global_means(micro_logs, world)
                engine.backward(loss)
                if rank == 0 and cfg.zero.stage == 0 and micro == cfg.optim.grad_accum - 1:
                    own_norm = _grad_norm(engine.module)  # DeepSpeed's basic optimizer has none
                engine.step()
            ds_norm = engine.get_global_grad_norm()
            grad_norm = float(ds_norm) if ds_norm is not None else own_norm
            step += 1
            extra = means()
            loss_value = extra.pop(_LOSS)
            dt = time.perf_counter() - t0
            losses.append(loss_value)
            step_times.append(dt)
            data_waits.append(data_wait)
            if rank == 0:
                record = {
                    "step": step,
                    "loss": loss_value,
                    "lr": lr,
                    "epoch": loader.epoch if loader.step_in_epoch else loader.epoch - 1,
                    "samples_per_s": samples_per_step / dt if dt > 0 else 0.0,
                    "elapsed_s": time.perf_counter() - t_start,
                    "attempt": attempt,
                    "resumed_from": resumed_from,
                    "step_s": dt,
                    "data_wait_s": data_wait,
                    **({"grad_norm": grad_norm} if grad_norm is not None else {}),
                    **memory_stats(device),
                    **extra,
                }
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                assert tb is not None
                tb.add(record)
                now = time.perf_counter()
                due = step % cfg.log_every == 0 and now - last_line >= STEP_LINE_EVERY_S
                if due or step in (first_step, end):
                    last_line = now
                    mean_dt = sum(step_times) / len(step_times)
                    _log(
                        rank,
                        f"step {step}/{cfg.max_steps}  {samples_per_step / mean_dt:.1f} "
                        f"samples/s  loss {loss_value:.4f}  lr {lr:.3g}  "
                        f"ETA {format_duration((end - step) * mean_dt)}",
                    )
            if step % cfg.checkpoint.every_steps == 0 or step == end:
                save(step)
            if kill_after == step:
                _sigkill_self()
            if (rank, step) in kill_ranks:
                _sigkill_once(run, rank, step)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        if tb is not None:
            tb.close()

    total_time = sum(step_times)
    summary = {
        "first_step": first_step,
        "last_step": step,
        "losses": losses,
        "samples_per_s": (samples_per_step * len(step_times) / total_time) if total_time else 0.0,
        "latest_checkpoint": latest_checkpoint(run),
        "resumed_from": resumed_from,
        "world_size": world,
        "attempt": attempt,
        "train_s": time.perf_counter() - t_start,
    }
    finished = None
    if first_step > end and rank == 0:  # nothing to train: the attempt that trained counts
        finished = _trained_summary(run, end, samples_per_step, summary)
        summary = finished or summary
    if mirror is not None:
        # a staged run: each node has its own staging folder, where `launch.train` reads
        # the summary (rank 0's, which knows the latest complete checkpoint)
        box = [summary]
        dist.broadcast_object_list(box, src=0)
        summary = box[0]
    node_first = int(os.environ.get("LOCAL_RANK", rank)) == 0
    if rank == 0 or (mirror is not None and node_first):
        storage.write_json(run / SUMMARY_FILE, summary, sort_keys=False, durable=True)
    if rank == 0 and finished is not None:
        _log(
            rank,
            f"nothing to train: attempt {finished['attempt']} had already trained to step "
            f"{step}; its summary stands",
        )
    elif rank == 0:
        _log(
            rank,
            f"done: steps {first_step}..{step}, latest checkpoint "
            f"{summary['latest_checkpoint']}, {summary['samples_per_s']:.1f} samples/s",
        )
        hint = loader_bound_hint(data_waits, step_times, in_rank=in_rank)
        if hint is not None:
            _log(rank, hint)
    dist.barrier()
    engine.destroy()
    if created_group:
        dist.destroy_process_group()
    return summary
