"""The Ray Train launcher trains exactly like the local one (embedded Ray, 2 gloo workers),
through a stop, a resume and a worker SIGKILLed mid-run.

Same config (`short_run_config`) and world size, same pinned thread count: the per-step
losses must equal the local launcher's session reference run (==) and so must the final
weights. Ray resumes that reference as it stood at step 2 (a resume across launchers);
rank 1 is SIGKILLed after step 5 (self-healing, as `test_restarts` checks for the local
launcher), so Ray Train (`FailureConfig.max_failures`) restarts the group from step 4. One
launch: each costs ~20 s of process starts on 2 cores (stopping a Ray run part-way is the
quickstart's job, in tests/e2e/test_quickstart.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.training import launch, train
from kiln.training.checkpoint import checkpoints_dir
from kiln.training.loop import FAULT_SIGKILL_RANK
from tests.helpers_training import SHORT_RUN_STEPS as MAX_STEPS
from tests.helpers_training import check_healed, rewind_run
from tests.helpers_training import short_run_config as config

pytestmark = pytest.mark.slow


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    tag = f"step_{MAX_STEPS:08d}"
    payload = torch.load(checkpoints_dir(run) / tag / "model.pt", weights_only=True)
    state: dict[str, torch.Tensor] = payload["state_dict"]
    return state


def test_ray_train_matches_local_launcher_bitwise_through_resume_and_restart(
    short_dataset: str,
    short_reference_run: Path,
    short_reference: list[float],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    ray_session: None,
) -> None:
    # a line a second while the group starts (10 s, then 30 s, by default)
    monkeypatch.setattr(launch, "_SAY_STARTING_AFTER_S", 1.0)
    monkeypatch.setattr(launch, "_SAY_WAITING_EVERY_S", 1.0)
    # the local reference as it stood at step 2: Ray resumes a run it did not start
    run = rewind_run(short_reference_run, tmp_path / "ray", 2)
    # set after the session's Ray started: the launcher must pass it to the workers itself
    monkeypatch.setenv(FAULT_SIGKILL_RANK, "1@5")
    rest = train(
        config(short_dataset),
        str(run),
        num_workers=2,
        cpus_per_worker=1,
        launcher="ray",
        resume=True,
        max_restarts=1,
    )
    # resumed from step 2, trained 3..5, rank 1 killed, the group restarted from step 4
    check_healed(run, rest, short_reference)
    # the start said what it waited for: the workers' processes, once Ray Train placed them
    said = capfd.readouterr().out  # kiln's lines (`say`)
    assert "Ray Train placed 2 workers with 1 CPU each (placement pack) and is starting" in said
    assert "waiting for the cluster to free" not in said  # nothing else holds the CPUs
    assert "does not hold on this thread" not in said  # the workers got MALLOC_ARENA_MAX
    assert rest.launcher == "ray" and len(rest.nodes) == 2
    attempts_files = list((run / "ray_train").glob("*/kiln_attempts.jsonl"))
    attempts = [
        [(a["attempt"], a["resume_from"]) for a in map(json.loads, f.read_text().splitlines())]
        for f in attempts_files
    ]
    assert attempts == [[(1, "step_00000002"), (2, "step_00000004")]]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if r["attempt"] > 1] == [3, 4, 5, 5, 6]

    ray_w, local_w = final_weights(run), final_weights(short_reference_run)
    assert ray_w.keys() == local_w.keys()
    for name, tensor in local_w.items():
        assert torch.equal(tensor, ray_w[name]), name
