"""Reliability campaign: SIGKILL training and curation at random points, resume, and count
how many runs end bitwise (training) or byte (curation) identical to uninterrupted ones.

Training (2 ranks, local launcher, DeepSpeed ZeRO 0-3 in turn, a tiny CLIP on a 48-sample
generated dataset, 10 steps, a checkpoint every 2 steps, the run crossing an epoch):

- ``--step-kills``: every rank SIGKILLs itself after a random step
  (``KILN_FAULT_SIGKILL_AFTER_STEP``), which can fall on a checkpoint step or between two;
- ``--save-kills``: every rank SIGKILLs itself in the middle of saving a random checkpoint,
  after DeepSpeed's files are written and before the checkpoint is marked complete
  (``KILN_FAULT_SIGKILL_IN_SAVE``).

Kills are chained within a run (kill, resume, kill again later, ..., resume to the end);
each kill is followed by a resume from the latest complete checkpoint. A kill counts as
identical when the attempt that resumed after it reproduced the uninterrupted run's loss
at every step it ran (``==`` on the floats ``metrics.jsonl`` records), resumed from a
complete checkpoint no later than the kill (or, killed before the first checkpoint was
complete, started again at step 1), and, for the last one of a run, ended with final
weights equal tensor for tensor.

Curation (``--curation-kills``; the quickstart's plan on a 240-row procedural pool, local
executor, `kiln curate` as a subprocess): alternately one worker process of the pool or
the `kiln curate` driver itself is SIGKILLed at a random moment of the run. After a worker
kill the driver reruns the lost tasks and finishes; after a driver kill `kiln curate` is run
again and resumes from its finished tasks. A kill counts as identical when the shards' bytes
equal those of an uninterrupted curation.

Prints one line per kill and a summary, and writes ``runs/bench/reliability/result.json``.
Defaults are the full campaign of issue 11 (20 + 20 + 10); ``--quick`` runs 4 + 4 + 3.
Run: python benchmarks/reliability_campaign.py [--quick] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.helpers_* when run as a script
WORK = REPO / "runs" / "bench" / "reliability"
MAX_STEPS = 10
EVERY = 2
STAGES = (0, 1, 2, 3)


# --------------------------------------------------------------------------- training


def _train_config(dataset: str, stage: int) -> Any:
    from kiln.training.config import TrainConfig
    from tests.helpers_training import TINY_MODEL

    return TrainConfig.model_validate(
        {
            "data": {"dataset": dataset, "batch_size": 4, "num_workers": 1, "shuffle_buffer": 8},
            "model": TINY_MODEL,
            "optim": {"lr": 2e-3, "warmup_steps": 2},
            # threshold 0: ZeRO-3 partitions every parameter, even this tiny model's
            "zero": {"stage": stage, "param_persistence_threshold": 0},
            "checkpoint": {"every_steps": EVERY, "keep_last": 100},
            "max_steps": MAX_STEPS,
            "log_every": MAX_STEPS,
            "seed": 7,
        }
    )


def _metrics(run: Path) -> list[dict[str, Any]]:
    records = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by the kill
            continue
    return records


def _weights(run: Path) -> dict[str, Any]:
    import torch

    from kiln.training.checkpoint import checkpoints_dir, latest_checkpoint

    tag = latest_checkpoint(run)
    payload = torch.load(checkpoints_dir(run) / str(tag) / "model.pt", weights_only=True)
    return dict(payload["state_dict"])


def _same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _launch(cfg: Any, run: Path, resume: bool, fault: tuple[str, int] | None) -> bool:
    """One `train` launch (2 ranks, local launcher); True when it was killed as planned."""
    from kiln.training import TrainLaunchError, train
    from kiln.training.loop import FAULT_SIGKILL_AFTER_STEP, FAULT_SIGKILL_IN_SAVE

    names = {"step": FAULT_SIGKILL_AFTER_STEP, "save": FAULT_SIGKILL_IN_SAVE}
    if fault is not None:
        os.environ[names[fault[0]]] = str(fault[1])
    try:
        train(cfg, str(run), num_workers=2, launcher="local", resume=resume)
        return False
    except TrainLaunchError:
        return True
    finally:
        for name in names.values():
            os.environ.pop(name, None)


def _plan_chain(
    rng: random.Random, kinds: list[str], resume_point: int = 0
) -> list[tuple[str, int]]:
    """Kill steps for one run: each after the checkpoint the previous kill leaves, so the
    run progresses; stops early when no room is left (the rest go to a new run)."""
    chain = []
    for kind in kinds:
        if kind == "step":
            if resume_point + 1 > MAX_STEPS - 1:
                break
            at = rng.randint(resume_point + 1, MAX_STEPS - 1)
            resume_point = at // EVERY * EVERY
        else:
            saves = list(range(resume_point + EVERY, MAX_STEPS, EVERY))
            if not saves:
                break
            at = rng.choice(saves)
            resume_point = at - EVERY
        chain.append((kind, at))
    return chain


def checked_from_start(records: list[dict[str, Any]]) -> bool:
    """The attempt's records start at step 1 (a run that had no checkpoint to resume)."""
    return bool(records) and int(records[0]["step"]) == 1


def training_campaign(step_kills: int, save_kills: int, rng: random.Random) -> dict[str, Any]:
    from tests.helpers_datasets import write_tiny_dataset

    root = WORK / "train"
    shutil.rmtree(root, ignore_errors=True)
    dataset = str(write_tiny_dataset(root / "ds", num_samples=48))
    kinds = ["step"] * step_kills + ["save"] * save_kills
    rng.shuffle(kinds)
    per_stage: dict[int, list[str]] = {s: [] for s in STAGES}
    for i, kind in enumerate(kinds):
        per_stage[STAGES[i % len(STAGES)]].append(kind)
    outcomes: list[dict[str, Any]] = []
    for stage, todo in per_stage.items():
        if not todo:
            continue
        cfg = _train_config(dataset, stage)
        ref_run = root / f"zero{stage}-reference"
        _launch(cfg, ref_run, False, None)
        reference = {r["step"]: r["loss"] for r in _metrics(ref_run)}
        ref_weights = _weights(ref_run)
        assert sorted(reference) == list(range(1, MAX_STEPS + 1)), "reference run incomplete"
        n_run = 0
        while todo:
            chain = _plan_chain(rng, todo)
            todo = todo[len(chain) :]
            n_run += 1
            run = root / f"zero{stage}-run{n_run}"
            for k, fault in enumerate([*chain, None]):
                killed = _launch(cfg, run, k > 0, fault)
                if fault is not None and not killed:
                    raise RuntimeError(f"ZeRO-{stage} {run.name}: kill {fault} did not happen")
                if k == 0:
                    continue
                records = [r for r in _metrics(run) if r.get("attempt") == k + 1]
                before = chain[k - 1]
                resumed = records[0]["resumed_from"] if records else None
                losses_ok = bool(records) and all(
                    r["loss"] == reference[r["step"]] for r in records
                )
                limit = before[1] if before[0] == "step" else before[1] - 1
                # killed before any checkpoint was complete: the run starts again at step 1
                # (and must reproduce it); otherwise it resumes from one at or before the kill
                if limit < EVERY:
                    resume_ok = resumed is None and checked_from_start(records)
                else:
                    resume_ok = resumed is not None and resumed <= limit
                weights_ok = fault is not None or _same_weights(_weights(run), ref_weights)
                checked = [int(r["step"]) for r in records] or [0]
                outcome = {
                    "stage": stage,
                    "run": run.name,
                    "kind": before[0],
                    "at_step": before[1],
                    "resumed_from": resumed,
                    "steps_checked": checked if records else [],
                    "identical": losses_ok and resume_ok and weights_ok,
                }
                outcomes.append(outcome)
                print(
                    f"[reliability] ZeRO-{stage} {run.name}: SIGKILL "
                    f"{'in the save of' if before[0] == 'save' else 'after'} step {before[1]}, "
                    f"resumed from {resumed}, steps {checked[0]}..{checked[-1]} "
                    f"{'bitwise identical' if outcome['identical'] else 'DIFFERENT'}",
                    flush=True,
                )
    return {"kills": outcomes}


# --------------------------------------------------------------------------- curation


def _curate_recipe(root: Path, pool: Path) -> Path:
    from tests.helpers_datasets import curate_recipe

    spec = curate_recipe(root)
    spec["input"]["paths"] = [str(pool)]
    for stage in spec["stages"]:
        if stage["stage"] == "metaclip_match":
            stage["entries"] = str(pool / "metadata.txt")
    path = root / "curate.yaml"
    root.mkdir(parents=True, exist_ok=True)
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return path


def _kiln_curate(recipe: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "kiln", "curate", str(recipe)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _shard_bytes(root: Path) -> dict[str, str]:
    shards = root / "curate" / "dataset" / "shards"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shards.iterdir())}


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def curation_campaign(kills: int, rng: random.Random) -> dict[str, Any]:
    root = WORK / "curate"
    shutil.rmtree(root, ignore_errors=True)
    pool = root / "pool"
    ref = _kiln_curate(_curate_recipe(root / "reference", pool))  # generates the pool
    started = time.perf_counter()
    if ref.wait() != 0:
        raise RuntimeError("the uninterrupted curation failed")
    ref_s = time.perf_counter() - started
    reference = _shard_bytes(root / "reference")
    outcomes = []
    for i in range(kills):
        target = "worker" if i % 2 == 0 else "driver"
        work = root / f"kill{i + 1}"
        recipe = _curate_recipe(work, pool)
        proc = _kiln_curate(recipe)
        t0 = time.perf_counter()
        while not _children(proc.pid) and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.7) * max(0.5, ref_s - (time.perf_counter() - t0)))
        victims = _children(proc.pid) if target == "worker" else [proc.pid]
        killed = None
        if proc.poll() is None and victims:
            killed = rng.choice(victims)
            try:
                os.kill(killed, signal.SIGKILL)
            except ProcessLookupError:
                killed = None
        code = proc.wait()
        reruns = 0
        if code != 0:  # the driver died (or gave up): run it again, as a user would
            reruns = 1
            if _kiln_curate(recipe).wait() != 0:
                raise RuntimeError(f"curation {work.name} failed after its rerun")
        identical = _shard_bytes(work) == reference
        outcomes.append(
            {
                "target": target,
                "killed_pid": killed,
                "driver_exit": code,
                "reruns": reruns,
                "identical": identical,
            }
        )
        what = f"SIGKILL {target} pid {killed}" if killed else f"no {target} left to kill"
        print(
            f"[reliability] curation {work.name}: {what}, driver exit {code}, "
            f"{reruns} rerun(s): {'byte identical' if identical else 'DIFFERENT'}",
            flush=True,
        )
    return {"kills": outcomes, "reference_s": round(ref_s, 1)}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-kills", type=int, default=20)
    parser.add_argument("--save-kills", type=int, default=20)
    parser.add_argument("--curation-kills", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="4 + 4 + 3 kills")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.step_kills, args.save_kills, args.curation_kills = 4, 4, 3
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rng = random.Random(args.seed)
    started = time.perf_counter()
    result: dict[str, Any] = {"args": vars(args)}
    if args.step_kills or args.save_kills:
        result["training"] = training_campaign(args.step_kills, args.save_kills, rng)
    if args.curation_kills:
        result["curation"] = curation_campaign(args.curation_kills, rng)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    lines = []
    for kind, label in (("step", "after a step"), ("save", "during a save")):
        kills = [k for k in result.get("training", {}).get("kills", []) if k["kind"] == kind]
        same = sum(k["identical"] for k in kills)
        lines.append(f"training killed {label}: {same}/{len(kills)} resumed bitwise identical")
    kills = result.get("curation", {}).get("kills", [])
    same = sum(k["identical"] for k in kills)
    lines.append(f"curation killed (worker or driver): {same}/{len(kills)} byte identical")
    result["summary"] = lines
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    for line in lines:
        print(f"[reliability] {line}")
    print(f"[reliability] {result['wall_s']}s; details in {WORK / 'result.json'}")
    every = [*result.get("training", {}).get("kills", []), *kills]
    return 0 if all(k["identical"] for k in every) else 1


if __name__ == "__main__":
    sys.exit(main())
