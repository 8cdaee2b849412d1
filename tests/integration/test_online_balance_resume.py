"""Online balancing resumes exactly: a 2-rank run (2 DataLoader workers per rank, ZeRO-2,
CPU fp32, local launcher) on a curated matched set with `data.balance: {mode: online}` is
SIGKILLed mid-epoch after step 5, resumes from its step-3 checkpoint (mid-rotation: 3 % 2
workers) and crosses into epoch 1, whose kept set differs; every loss equals the
uninterrupted run's at the same step (==). A resume with another t is refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.training import TrainLaunchError, latest_checkpoint, train
from kiln.training.config import TrainConfig
from kiln.training.data import WebDatasetLoader
from kiln.training.loop import FAULT_SIGKILL_AFTER_STEP
from tests.helpers_datasets import curate_matched_dataset
from tests.helpers_training import TINY_MODEL

MAX_STEPS = 10


def config(dataset: str, t: int = 10) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {
                "dataset": dataset,
                "batch_size": 16,
                "num_workers": 2,
                "shuffle_buffer": 16,
                "balance": {"mode": "online", "t": t},
            },
            "model": TINY_MODEL,
            "optim": {"lr": 2e-3, "warmup_steps": 2},
            "zero": {"stage": 2},
            "checkpoint": {"every_steps": 3, "keep_last": 2},
            "max_steps": MAX_STEPS,
            "log_every": 5,
            "seed": 11,
        }
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(curate_matched_dataset(tmp_path_factory.mktemp("online")))


@pytest.mark.slow
def test_online_balanced_run_resumes_bitwise(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(dataset)
    steps = WebDatasetLoader.from_config(cfg, world_size=2).steps_per_epoch
    assert 5 < steps < MAX_STEPS  # killed in epoch 0, ends in epoch 1
    ref = train(cfg, str(tmp_path / "reference"), num_workers=2, launcher="local")
    assert (ref.last_step, len(set(ref.losses))) == (MAX_STEPS, MAX_STEPS)

    run = tmp_path / "run"
    monkeypatch.setenv(FAULT_SIGKILL_AFTER_STEP, "5")
    with pytest.raises(TrainLaunchError) as killed:
        train(cfg, str(run), num_workers=2, launcher="local")
    assert -9 in killed.value.exit_codes.values()
    assert latest_checkpoint(run) == "step_00000003"
    monkeypatch.delenv(FAULT_SIGKILL_AFTER_STEP)

    other_t = config(dataset, t=12)
    with pytest.raises(TrainLaunchError):
        train(other_t, str(run), num_workers=2, launcher="local", resume=True)
    log = next((run / "logs").glob("train002-rank0.log")).read_text()
    assert "cannot resume the data loader: checkpoint has balance=" in log
    assert "set data.balance to the value the run started with" in log

    resumed = train(cfg, str(run), num_workers=2, launcher="local", resume=True)
    assert (resumed.resumed_from, resumed.first_step, resumed.last_step) == (3, 4, MAX_STEPS)
    assert resumed.losses == ref.losses[3:]  # exact, not approximate
