"""Self-healing: a rank SIGKILLed mid-run is restarted from the latest complete checkpoint
and the run finishes with the losses of one that never failed (2 gloo ranks, DeepSpeed
ZeRO-2, CPU fp32), with the local launcher (`max_restarts`) and with Ray Train
(`FailureConfig.max_failures`).

`short_run_config`: steps 1..6 with checkpoints at 2, 4, 6; rank 1 alone dies after step 5
(once: the fault's marker file stops it from firing again), so the restarted attempt resumes
from step 4 and trains 5 and 6 again. `metrics.jsonl` then holds step 5 twice; the last record of each step
must equal the uninterrupted reference bitwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.training import TrainLaunchError, TrainSummary, train
from kiln.training.loop import FAULT_SIGKILL_AFTER_STEP, FAULT_SIGKILL_RANK
from tests.helpers_training import SHORT_RUN_STEPS as MAX_STEPS
from tests.helpers_training import short_run_config as config

pytestmark = pytest.mark.slow


def last_loss_per_step(run: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]  # a later attempt's record of a step wins
    return out


def check_healed(run: Path, summary: TrainSummary, reference: list[float]) -> None:
    assert summary.restarts == 1
    assert (summary.resumed_from, summary.first_step, summary.last_step) == (4, 5, MAX_STEPS)
    assert summary.losses == reference[4:]  # exact
    assert last_loss_per_step(run) == dict(enumerate(reference, start=1))
    assert (run / ".fault-sigkill-rank1-step5").is_file()  # the fault did fire
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(5) == 2  # trained once before the kill and once after the restart


def test_local_launcher_restarts_a_killed_rank(
    short_dataset: str,
    short_reference: list[float],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(FAULT_SIGKILL_RANK, "1@5")
    run = tmp_path / "run"
    summary = train(
        config(short_dataset), str(run), num_workers=2, launcher="local", max_restarts=2
    )
    check_healed(run, summary, short_reference)
    out = capfd.readouterr().out
    assert "[kiln] rank 1 exited with code -9 at " in out
    assert "restarting from step_00000004 (restart 1 of 2)" in out


def test_local_launcher_gives_up_when_restarts_are_spent(
    short_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every attempt dies after step 3: one restart (from step 2), then the launch fails
    monkeypatch.setenv(FAULT_SIGKILL_AFTER_STEP, "3")
    run = tmp_path / "run"
    with pytest.raises(TrainLaunchError, match=r"after 1 restart\(s\)") as failed:
        train(config(short_dataset), str(run), num_workers=2, launcher="local", max_restarts=1)
    assert -9 in failed.value.exit_codes.values()
    attempts = {
        json.loads(line)["attempt"] for line in (run / "metrics.jsonl").read_text().splitlines()
    }
    assert attempts == {1, 2}


def test_ray_train_restarts_a_killed_worker(
    short_dataset: str,
    short_reference: list[float],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ray_session: None,
) -> None:
    # set after the session's Ray started: the launcher must pass it to the workers itself
    monkeypatch.setenv(FAULT_SIGKILL_RANK, "1@5")
    run = tmp_path / "run"
    summary = train(config(short_dataset), str(run), num_workers=2, launcher="ray", max_restarts=1)
    check_healed(run, summary, short_reference)
    assert summary.launcher == "ray" and len(summary.nodes) == 2
    (attempts_file,) = (run / "ray_train").glob("*/kiln_attempts.jsonl")
    attempts = [json.loads(line) for line in attempts_file.read_text().splitlines()]
    assert [(a["attempt"], a["resume_from"]) for a in attempts] == [
        (1, None),
        (2, "step_00000004"),
    ]
