"""The Ray Train launcher trains exactly like the local one (embedded Ray, 2 gloo workers).

Same config and world size, same pinned thread count: the per-step losses must be equal
(==) and so must the final weights. The Ray run is also stopped after step 2 and resumed
through Ray, so checkpointing and resume are covered under Ray Train too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.training import train
from kiln.training.checkpoint import checkpoints_dir
from kiln.training.config import TrainConfig
from tests.helpers_datasets import write_tiny_dataset
from tests.helpers_training import TINY_MODEL

pytestmark = pytest.mark.slow


def config(dataset: str, *, stop_after: int | None = None) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {"dataset": dataset, "batch_size": 4, "num_workers": 1, "shuffle_buffer": 8},
            "model": TINY_MODEL,
            "optim": {"lr": 2e-3, "warmup_steps": 1},
            "zero": {"stage": 2},
            "checkpoint": {"every_steps": 2},
            "max_steps": 4,
            "log_every": 1,
            "seed": 3,
            "stop_after_step": stop_after,
        }
    )


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    payload = torch.load(checkpoints_dir(run) / "step_00000004" / "model.pt", weights_only=True)
    state: dict[str, torch.Tensor] = payload["state_dict"]
    return state


def test_ray_train_matches_local_launcher_bitwise(tmp_path: Path, ray_session: None) -> None:
    dataset = str(write_tiny_dataset(tmp_path / "ds", num_samples=48))
    local = train(config(dataset), str(tmp_path / "local"), num_workers=2, launcher="local")
    assert len(local.losses) == 4

    run = tmp_path / "ray"
    first = train(
        config(dataset, stop_after=2), str(run), num_workers=2, cpus_per_worker=1, launcher="ray"
    )
    assert (first.launcher, first.world_size, first.last_step) == ("ray", 2, 2)
    assert first.latest_checkpoint == "step_00000002"
    rest = train(
        config(dataset), str(run), num_workers=2, cpus_per_worker=1, launcher="ray", resume=True
    )
    assert (rest.resumed_from, rest.first_step, rest.last_step) == (2, 3, 4)

    assert first.losses + rest.losses == local.losses  # exact
    ray_w, local_w = final_weights(run), final_weights(tmp_path / "local")
    assert ray_w.keys() == local_w.keys()
    for name, tensor in local_w.items():
        assert torch.equal(tensor, ray_w[name]), name
