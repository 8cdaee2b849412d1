"""Activation checkpointing under DeepSpeed ZeRO-3 (2 gloo ranks, CPU fp32): the blocks'
recompute in the backward pass gathers the partitioned parameters again, and the run's
losses equal, bitwise, the same run keeping its activations."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.training import train
from kiln.training.config import TrainConfig
from tests.helpers_datasets import write_tiny_dataset
from tests.helpers_training import TINY_MODEL


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_dataset(tmp_path_factory.mktemp("actckpt") / "ds", num_samples=32))


def _losses(dataset: str, run: Path, checkpointing: bool) -> list[float]:
    model = {**TINY_MODEL, "vision": {**TINY_MODEL["vision"], "layers": 2}}
    cfg = TrainConfig.model_validate(
        {
            "data": {"dataset": dataset, "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8},
            "model": {**model, "activation_checkpointing": checkpointing},
            "optim": {"lr": 2e-3, "warmup_steps": 1},
            "zero": {"stage": 3, "param_persistence_threshold": 0},
            "checkpoint": {"every_steps": 100},
            "max_steps": 4,
            "seed": 7,
        }
    )
    result = train(cfg, str(run), num_workers=2, launcher="local")
    return list(result.losses)


def test_zero3_with_activation_checkpointing_matches_without(dataset: str, tmp_path: Path) -> None:
    plain = _losses(dataset, tmp_path / "plain", False)
    recomputed = _losses(dataset, tmp_path / "recomputed", True)
    assert len(plain) == 4 and recomputed == plain
