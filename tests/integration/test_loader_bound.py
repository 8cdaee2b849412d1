"""A run whose loader cannot keep up says so at the end, with the settings that would feed
it faster (real `kiln train`, 1 rank, one loader worker process, 1,536-px JPEGs for a
16-px model: decoding a batch takes several times the step)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.training import train
from kiln.training.config import TrainConfig
from tests.helpers_datasets import write_tiny_dataset
from tests.helpers_training import TINY_MODEL


@pytest.mark.slow
def test_a_loader_bound_run_is_told_how_to_feed_it(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    dataset = write_tiny_dataset(tmp_path / "ds", num_samples=16, image_size=1536)
    cfg = TrainConfig.model_validate(
        {
            "data": {
                "dataset": str(dataset),
                "batch_size": 4,
                "num_workers": 1,
                "worker_processes": "always",
            },
            "model": TINY_MODEL,
            "checkpoint": {"every_steps": 8},
            "max_steps": 8,
        }
    )
    train(cfg, str(tmp_path / "run"), num_workers=1, launcher="local")
    out = " ".join(capfd.readouterr().out.split())
    assert "[kiln] the loader held this run back: rank 0 waited for its batches" in out
    assert "data.num_workers" in out and "data.fast_decode: true" in out
