"""Exact resume for every objective besides CLIP (which test_resume.py covers in depth):
2 gloo ranks, real DeepSpeed ZeRO-2, CPU fp32, local launcher.

Per objective: a reference run of 6 steps; a run SIGKILLed after step 4 (latest
checkpoint: step 3); its resume to step 6. The resumed losses and the objective's logged
scalars must equal the reference's (==), and the final weights tensor for tensor. MAE's
masks come from per-sample seeds of (seed, epoch, uid), so its resume is exact too.

Then the same run under ZeRO-3 with every parameter partitioned: each tower must read its
own parameters inside its own forward (where ZeRO-3 gathers them), or this run crashes or
drifts. Its losses match ZeRO-2's to rounding (sums are reduced in another order).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.training import TrainLaunchError, latest_checkpoint, train
from kiln.training.checkpoint import checkpoints_dir
from kiln.training.config import TrainConfig
from kiln.training.loop import FAULT_SIGKILL_AFTER_STEP
from tests.helpers_datasets import write_tiny_dataset
from tests.helpers_training import tiny_flavor

MAX_STEPS = 6
LOGGED = {"siglip": "logit_bias", "coca": "caption_loss", "mae": None}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_dataset(tmp_path_factory.mktemp("objres") / "ds", num_samples=48))


def _config(dataset: str, arch: str, stage: int = 2) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {"dataset": dataset, "batch_size": 4, "num_workers": 1, "shuffle_buffer": 8},
            "model": tiny_flavor(arch),
            "optim": {"lr": 2e-3, "warmup_steps": 2},
            "zero": {"stage": stage, "param_persistence_threshold": 0},
            "checkpoint": {"every_steps": 3, "keep_last": 2},
            "max_steps": MAX_STEPS,
            "seed": 5,
        }
    )


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    path = checkpoints_dir(run) / f"step_{MAX_STEPS:08d}" / "model.pt"
    state: dict[str, torch.Tensor] = torch.load(path, weights_only=True)["state_dict"]
    return state


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(LOGGED))
def test_objective_resumes_bitwise(
    arch: str, dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(dataset, arch)
    ref = train(cfg, str(tmp_path / "reference"), num_workers=2, launcher="local")
    assert len(ref.losses) == MAX_STEPS and len(set(ref.losses)) > 1

    run = tmp_path / "run"
    monkeypatch.setenv(FAULT_SIGKILL_AFTER_STEP, "4")
    with pytest.raises(TrainLaunchError):
        train(cfg, str(run), num_workers=2, launcher="local")
    assert latest_checkpoint(run) == "step_00000003"
    monkeypatch.delenv(FAULT_SIGKILL_AFTER_STEP)

    resumed = train(cfg, str(run), num_workers=2, launcher="local", resume=True)
    assert (resumed.resumed_from, resumed.first_step) == (3, 4)
    assert resumed.losses == ref.losses[3:]  # exact, not approximate

    key = LOGGED[arch]
    if key is not None:
        ref_logged = {r["step"]: r[key] for r in _metrics(tmp_path / "reference")}
        for rec in _metrics(run):
            assert rec[key] == ref_logged[rec["step"]], (key, rec["step"])
    ref_w, run_w = _weights(tmp_path / "reference"), _weights(run)
    assert ref_w.keys() == run_w.keys()
    for name, tensor in ref_w.items():
        assert torch.equal(tensor, run_w[name]), name

    zero3 = train(
        _config(dataset, arch, 3), str(tmp_path / "zero3"), num_workers=2, launcher="local"
    )
    torch.testing.assert_close(zero3.losses, ref.losses, rtol=1e-4, atol=1e-5)
