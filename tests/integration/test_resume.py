"""Exact resume: runs killed mid-training and mid-checkpoint continue bitwise like one that
never stopped (2 gloo ranks, real DeepSpeed ZeRO-2 / ZeRO-3, CPU fp32, local launcher).

One scenario per ZeRO stage, four launches:

1. reference: steps 1..10 uninterrupted (checkpoints at 3, 6, 9, 10);
2. attempt 1: SIGKILL after step 5 -> the launcher fails, `latest` is step 3;
3. attempt 2: resumes from 3, SIGKILL in the middle of saving step 6 -> `latest` is still 3;
4. attempt 3: resumes from 3 to the end.

Every loss of every attempt must equal the reference's at the same step (==), and the final
weights file must be equal tensor for tensor. With 2 DataLoader workers per rank and a resume
at step 3, the resumed loader starts mid-rotation (3 % 2 == 1), and 8 steps per epoch make
the run cross an epoch boundary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.training import TrainLaunchError, latest_checkpoint, train
from kiln.training.checkpoint import COMPLETE_MARKER, checkpoints_dir
from kiln.training.config import TrainConfig
from kiln.training.loop import FAULT_SIGKILL_AFTER_STEP, FAULT_SIGKILL_IN_SAVE
from tests.helpers_datasets import write_tiny_dataset
from tests.helpers_training import TINY_MODEL, rewind_run

MAX_STEPS = 10


def tiny_config(dataset: str, stage: int) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {"dataset": dataset, "batch_size": 4, "num_workers": 2, "shuffle_buffer": 8},
            "model": TINY_MODEL,
            "optim": {"lr": 2e-3, "warmup_steps": 2, "grad_clip": 1.0},
            # threshold 0: ZeRO-3 partitions every parameter, even this tiny model's
            "zero": {"stage": stage, "param_persistence_threshold": 0},
            "checkpoint": {"every_steps": 3, "keep_last": 2},
            "max_steps": MAX_STEPS,
            "log_every": 5,
            "seed": 11,
        }
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_dataset(tmp_path_factory.mktemp("resume") / "ds", num_samples=64))


@pytest.fixture(scope="module")
def reference(dataset: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`reference(stage)`: the uninterrupted run of `tiny_config(stage)` (trained once per
    module) and its losses."""
    runs: dict[int, tuple[Path, list[float]]] = {}

    def get(stage: int) -> tuple[Path, list[float]]:
        if stage not in runs:
            run = tmp_path_factory.mktemp(f"reference-zero{stage}") / "run"
            ref = train(tiny_config(dataset, stage), str(run), num_workers=2, launcher="local")
            assert (ref.first_step, ref.last_step, len(ref.losses)) == (1, MAX_STEPS, MAX_STEPS)
            assert len(set(ref.losses)) > 1
            runs[stage] = (run, ref.losses)
        return runs[stage]

    return get


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path, tag: str) -> dict[str, torch.Tensor]:
    payload = torch.load(checkpoints_dir(run) / tag / "model.pt", weights_only=True)
    state: dict[str, torch.Tensor] = payload["state_dict"]
    return state


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_killed_run_resumes_bitwise(
    stage: int, dataset: str, reference: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(dataset, stage)
    ref_run, ref_losses = reference(stage)

    run = tmp_path / "run"
    monkeypatch.setenv(FAULT_SIGKILL_AFTER_STEP, "5")
    with pytest.raises(TrainLaunchError) as killed:
        train(cfg, str(run), num_workers=2, launcher="local")
    assert -9 in killed.value.exit_codes.values()
    assert latest_checkpoint(run) == "step_00000003"
    monkeypatch.delenv(FAULT_SIGKILL_AFTER_STEP)

    monkeypatch.setenv(FAULT_SIGKILL_IN_SAVE, "6")
    with pytest.raises(TrainLaunchError):
        train(cfg, str(run), num_workers=2, launcher="local", resume=True)
    torn = checkpoints_dir(run) / "step_00000006"
    assert (torn / "model.pt").is_file() and not (torn / COMPLETE_MARKER).exists()
    assert latest_checkpoint(run) == "step_00000003"
    assert (checkpoints_dir(run) / "latest").read_text().strip() == "step_00000003"
    monkeypatch.delenv(FAULT_SIGKILL_IN_SAVE)

    resumed = train(cfg, str(run), num_workers=2, launcher="local", resume=True)
    assert (resumed.resumed_from, resumed.first_step, resumed.last_step) == (3, 4, MAX_STEPS)
    assert resumed.losses == ref_losses[3:]  # exact, not approximate

    by_attempt: dict[int, dict[int, float]] = {}
    for rec in metrics(run):
        by_attempt.setdefault(rec["attempt"], {})[rec["step"]] = rec["loss"]
    assert sorted(by_attempt) == [1, 2, 3]
    assert sorted(by_attempt[1]) == [1, 2, 3, 4, 5]
    assert sorted(by_attempt[2]) == [4, 5, 6]
    for steps in by_attempt.values():
        for step, loss in steps.items():
            assert loss == ref_losses[step - 1], f"step {step}"

    final = f"step_{MAX_STEPS:08d}"
    assert latest_checkpoint(run) == final
    ref_w, run_w = weights(ref_run, final), weights(run, final)
    assert ref_w.keys() == run_w.keys()
    for name, tensor in ref_w.items():
        assert torch.equal(tensor, run_w[name]), name
    kept = sorted(p.name for p in checkpoints_dir(run).iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000009", f"step_{MAX_STEPS:08d}"]  # keep_last=2, torn one pruned


def test_bad_starts_fail_before_any_rank_starts(dataset: str, tmp_path: Path) -> None:
    cfg = tiny_config(dataset, 2)
    run = tmp_path / "run"
    tag_dir = checkpoints_dir(run) / "step_00000003"
    tag_dir.mkdir(parents=True)
    (tag_dir / COMPLETE_MARKER).write_text("{}")
    with pytest.raises(FileExistsError, match="resume"):
        train(cfg, str(run), num_workers=2, launcher="local")  # would mix two runs
    missing = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dataset": "/no/such"})})
    with pytest.raises(FileNotFoundError, match="/no/such"):
        train(missing, str(tmp_path / "other"), num_workers=2, launcher="local")
    huge = cfg.model_copy(update={"data": cfg.data.model_copy(update={"batch_size": 64})})
    with pytest.raises(ValueError, match="batch_size"):
        train(huge, str(tmp_path / "other"), num_workers=2, launcher="local")
    assert not (tmp_path / "other" / "logs").exists()  # nothing was launched


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    dataset: str, reference: Any, tmp_path: Path
) -> None:
    """A truncated file in the latest checkpoint (checked against its COMPLETE marker's
    sizes and hashes): resume skips it, says so, keeps its folder aside, and continues
    from the previous complete checkpoint exactly as the first attempt ran."""
    ref_run, ref_losses = reference(2)
    run = rewind_run(ref_run, tmp_path / "run", MAX_STEPS)
    final = f"step_{MAX_STEPS:08d}"
    rng = checkpoints_dir(run) / final / "rng_rank1.pt"
    rng.write_bytes(rng.read_bytes()[:100])

    resumed = train(tiny_config(dataset, 2), str(run), num_workers=2, launcher="local", resume=True)
    assert (resumed.resumed_from, resumed.last_step) == (MAX_STEPS - 1, MAX_STEPS)
    assert resumed.losses == ref_losses[MAX_STEPS - 1 :]  # the last step again, bitwise
    damaged = checkpoints_dir(run) / f"{final}.damaged"
    assert (damaged / "rng_rank1.pt").stat().st_size == 100  # kept as it was, for a look
    log = next((run / "logs").glob("train002-rank0.log")).read_text()
    assert f"skipping damaged checkpoint {final} (rng_rank1.pt is 100 bytes" in log
    # kiln's AdamW is on ZeRO's list of tested optimizers (deepspeed_patches._register_zero_optimizer)
    assert "untested optimizer" not in log
    assert latest_checkpoint(run) == final
