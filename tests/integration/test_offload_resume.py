"""ZeRO-Offload resumes exactly: 2 gloo ranks, real DeepSpeed ZeRO-2 with
``zero.offload_optimizer: cpu`` (fp32 master weights and Adam state stepped by DeepSpeed's
compiled DeepSpeedCPUAdam), tiny CLIP flavor, local launcher.

A reference run of 6 steps; a run SIGKILLed after step 4 (latest checkpoint: step 3); its
resume to step 6. The resumed losses must equal the reference's (==) and the final weights
tensor for tensor. The checkpoint must show that the offloaded optimizer really ran: the
config DeepSpeed saved has the offload section, and the optimizer state is CPU Adam's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.training import TrainLaunchError, latest_checkpoint, train
from kiln.training.checkpoint import checkpoints_dir
from kiln.training.config import TrainConfig
from kiln.training.loop import FAULT_SIGKILL_AFTER_STEP
from tests.helpers_datasets import write_tiny_dataset
from tests.helpers_training import TINY_MODEL

MAX_STEPS = 6


def _config(dataset: str) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {"dataset": dataset, "batch_size": 4, "num_workers": 1, "shuffle_buffer": 8},
            "model": TINY_MODEL,
            "optim": {"lr": 2e-3, "warmup_steps": 2},
            "zero": {"stage": 2, "offload_optimizer": "cpu"},
            "checkpoint": {"every_steps": 3, "keep_last": 2},
            "max_steps": MAX_STEPS,
            "seed": 7,
        }
    )


def _step_dir(run: Path, step: int) -> Path:
    return checkpoints_dir(run) / f"step_{step:08d}"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    payload = torch.load(_step_dir(run, MAX_STEPS) / "model.pt", weights_only=True)
    state: dict[str, torch.Tensor] = payload["state_dict"]
    return state


@pytest.mark.slow
def test_zero2_optimizer_offload_trains_and_resumes_bitwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = str(write_tiny_dataset(tmp_path / "ds", num_samples=48))
    cfg = _config(dataset)
    ref = train(cfg, str(tmp_path / "reference"), num_workers=2, launcher="local")
    assert len(ref.losses) == MAX_STEPS and len(set(ref.losses)) > 1

    ckpt = _step_dir(tmp_path / "reference", MAX_STEPS)
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["ds_config"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    optim = torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    groups = optim["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    assert all("bias_correction" in g for g in groups)  # DeepSpeedCPUAdam's, not torch's

    run = tmp_path / "run"
    monkeypatch.setenv(FAULT_SIGKILL_AFTER_STEP, "4")
    with pytest.raises(TrainLaunchError):
        train(cfg, str(run), num_workers=2, launcher="local")
    assert latest_checkpoint(run) == "step_00000003"
    monkeypatch.delenv(FAULT_SIGKILL_AFTER_STEP)

    resumed = train(cfg, str(run), num_workers=2, launcher="local", resume=True)
    assert (resumed.resumed_from, resumed.first_step) == (3, 4)
    assert resumed.losses == ref.losses[3:]  # exact, not approximate
    ref_w, run_w = _weights(tmp_path / "reference"), _weights(run)
    assert ref_w.keys() == run_w.keys()
    for name, tensor in ref_w.items():
        assert torch.equal(tensor, run_w[name]), name
