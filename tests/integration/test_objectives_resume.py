"""Exact resume for every objective besides CLIP (which test_resume.py covers in depth):
2 gloo ranks, real DeepSpeed ZeRO-2, CPU fp32, local launcher.

Per objective: a 6-step ZeRO-2 run; the same run under ZeRO-3 with every parameter
partitioned (each tower must read its own parameters inside its own forward, where ZeRO-3
gathers them, or this run crashes or drifts), whose losses match ZeRO-2's to rounding (sums
are reduced in another order); then the ZeRO-3 run rewound to its step-3 checkpoint and
resumed to step 6. The resumed losses and the objective's logged scalars must equal the
uninterrupted run's (==), and the final weights tensor for tensor. MAE's masks come from
per-sample seeds of (seed, epoch, uid), so its resume is exact too. (Runs killed mid-step
and mid-save are test_resume.py's, for CLIP at ZeRO-2 and ZeRO-3.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.training import train
from kiln.training.checkpoint import checkpoints_dir
from kiln.training.config import TrainConfig
from tests.helpers_datasets import write_tiny_dataset
from tests.helpers_training import rewind_run, tiny_flavor

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
def test_objective_resumes_bitwise(arch: str, dataset: str, tmp_path: Path) -> None:
    zero2 = train(_config(dataset, arch), str(tmp_path / "zero2"), num_workers=2, launcher="local")
    assert len(zero2.losses) == MAX_STEPS and len(set(zero2.losses)) > 1

    ref = train(_config(dataset, arch, 3), str(tmp_path / "ref"), num_workers=2, launcher="local")
    torch.testing.assert_close(ref.losses, zero2.losses, rtol=1e-4, atol=1e-5)

    run = rewind_run(tmp_path / "ref", tmp_path / "run", 3)
    resumed = train(
        _config(dataset, arch, 3), str(run), num_workers=2, launcher="local", resume=True
    )
    assert (resumed.resumed_from, resumed.first_step) == (3, 4)
    assert resumed.losses == ref.losses[3:]  # exact, not approximate

    key = LOGGED[arch]
    if key is not None:
        ref_logged = {r["step"]: r[key] for r in _metrics(tmp_path / "ref")}
        resumed_records = [r for r in _metrics(run) if r["attempt"] == 2]
        assert [r["step"] for r in resumed_records] == list(range(4, MAX_STEPS + 1))
        for rec in resumed_records:
            assert rec[key] == ref_logged[rec["step"]], (key, rec["step"])
    ref_w, run_w = _weights(tmp_path / "ref"), _weights(run)
    assert ref_w.keys() == run_w.keys()
    for name, tensor in ref_w.items():
        assert torch.equal(tensor, run_w[name]), name
