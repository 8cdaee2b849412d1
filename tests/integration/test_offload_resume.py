"""ZeRO-Offload resumes exactly: 2 gloo ranks, real DeepSpeed, tiny CLIP flavor, local
launcher; ZeRO-2 with ``zero.offload_optimizer: cpu`` (fp32 master weights and Adam state
stepped by DeepSpeed's compiled DeepSpeedCPUAdam), and ZeRO-3 with the parameters offloaded
as well (``zero.offload_param: cpu``).

A reference run of 6 steps; a copy of it rewound to its step-3 checkpoint, resumed to step 6
(runs killed mid-step and mid-save are test_resume.py's). The resumed losses must equal the reference's (==) and the final weights
tensor for tensor. The checkpoint must show that the offloaded optimizer really ran: the
config DeepSpeed saved has the offload section, and the optimizer state is CPU Adam's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.training import train
from kiln.training.checkpoint import checkpoints_dir
from kiln.training.config import TrainConfig
from tests.helpers_datasets import write_tiny_dataset
from tests.helpers_training import TINY_MODEL, rewind_run

MAX_STEPS = 6


OFFLOAD = {
    2: {"stage": 2, "offload_optimizer": "cpu"},
    3: {"stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"},
}


def _config(dataset: str, stage: int) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {"dataset": dataset, "batch_size": 4, "num_workers": 1, "shuffle_buffer": 8},
            "model": TINY_MODEL,
            "optim": {"lr": 2e-3, "warmup_steps": 2},
            # threshold 0: ZeRO-3 partitions (and offloads) every parameter
            "zero": {**OFFLOAD[stage], "param_persistence_threshold": 0},
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


def _param_groups(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The base optimizer's param groups in a ZeRO-2 or ZeRO-3 optimizer state dict."""
    key = "base_optimizer_state" if "base_optimizer_state" in state else "optimizer_state_dict"
    groups: list[dict[str, Any]] = state[key]["param_groups"]
    return groups


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(OFFLOAD))
def test_offloaded_run_trains_and_resumes_bitwise(stage: int, tmp_path: Path) -> None:
    dataset = str(write_tiny_dataset(tmp_path / "ds", num_samples=48))
    cfg = _config(dataset, stage)
    ref = train(cfg, str(tmp_path / "reference"), num_workers=2, launcher="local")
    assert len(ref.losses) == MAX_STEPS and len(set(ref.losses)) > 1

    ckpt = _step_dir(tmp_path / "reference", MAX_STEPS)
    states_file = sorted(ckpt.glob("*model_states.pt"))[0]  # ZeRO-3 names one per rank
    zero = torch.load(states_file, weights_only=False)["ds_config"]["zero_optimization"]
    assert {k: zero[k]["device"] for k in zero if k.startswith("offload_")} == {
        k: v for k, v in OFFLOAD[stage].items() if k.startswith("offload_")
    }
    optim = torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    groups = _param_groups(optim["optimizer_state_dict"])
    assert groups and all("bias_correction" in g for g in groups)  # DeepSpeedCPUAdam's

    run = rewind_run(tmp_path / "reference", tmp_path / "run", 3)
    resumed = train(cfg, str(run), num_workers=2, launcher="local", resume=True)
    assert (resumed.resumed_from, resumed.first_step) == (3, 4)
    assert resumed.losses == ref.losses[3:]  # exact, not approximate
    ref_w, run_w = _weights(tmp_path / "reference"), _weights(run)
    assert ref_w.keys() == run_w.keys()
    for name, tensor in ref_w.items():
        assert torch.equal(tensor, run_w[name]), name
