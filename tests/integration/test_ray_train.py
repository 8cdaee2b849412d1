"""The Ray Train launcher trains exactly like the local one (embedded Ray, 2 gloo workers).

Same config (`short_run_config`) and world size, same pinned thread count: the per-step
losses must equal the local launcher's session reference run (==) and so must the final
weights. The Ray run is also stopped after step 2 and resumed through Ray, so checkpointing
and resume are covered under Ray Train too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.training import train
from kiln.training.checkpoint import checkpoints_dir
from tests.helpers_training import SHORT_RUN_STEPS as MAX_STEPS
from tests.helpers_training import short_run_config as config

pytestmark = pytest.mark.slow


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    tag = f"step_{MAX_STEPS:08d}"
    payload = torch.load(checkpoints_dir(run) / tag / "model.pt", weights_only=True)
    state: dict[str, torch.Tensor] = payload["state_dict"]
    return state


def test_ray_train_matches_local_launcher_bitwise(
    short_dataset: str,
    short_reference_run: Path,
    short_reference: list[float],
    tmp_path: Path,
    ray_session: None,
) -> None:
    run = tmp_path / "ray"
    first = train(
        config(short_dataset).model_copy(update={"stop_after_step": 2}),
        str(run),
        num_workers=2,
        cpus_per_worker=1,
        launcher="ray",
    )
    assert (first.launcher, first.world_size, first.last_step) == ("ray", 2, 2)
    assert first.latest_checkpoint == "step_00000002"
    rest = train(
        config(short_dataset),
        str(run),
        num_workers=2,
        cpus_per_worker=1,
        launcher="ray",
        resume=True,
    )
    assert (rest.resumed_from, rest.first_step, rest.last_step) == (2, 3, MAX_STEPS)

    assert first.losses + rest.losses == short_reference  # exact
    ray_w, local_w = final_weights(run), final_weights(short_reference_run)
    assert ray_w.keys() == local_w.keys()
    for name, tensor in local_w.items():
        assert torch.equal(tensor, ray_w[name]), name
