"""Self-healing: a rank SIGKILLed mid-run is restarted from the latest complete checkpoint
and the run finishes with the losses of one that never failed (2 gloo ranks, DeepSpeed
ZeRO-2, CPU fp32), with the local launcher (`max_restarts`). Ray Train's restart
(`FailureConfig.max_failures`) is checked with `check_healed` in `test_ray_train`, in the
same Ray launch as its resume.

`short_run_config`: steps 1..6 with checkpoints at 2, 4, 6; rank 1 alone dies after step 5
(once: the fault's marker file stops it from firing again), so the restarted attempt resumes
from step 4 and trains 5 and 6 again; it dies once more after the final save, and the
second restart has nothing left to train. `metrics.jsonl` then holds step 5 twice; the last record of each step
must equal the uninterrupted reference bitwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.training import TrainLaunchError, train
from kiln.training.loop import FAULT_SIGKILL_AFTER_STEP, FAULT_SIGKILL_RANK
from tests.helpers_training import SHORT_RUN_STEPS, check_healed
from tests.helpers_training import short_run_config as config

pytestmark = pytest.mark.slow


def test_local_launcher_restarts_a_killed_rank(
    short_dataset: str,
    short_reference: list[float],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # and once more right after the final save: the group restarted then has nothing to
    # train, and the run's summary must stay the trained attempt's (it was an empty one:
    # 'steps 7 -> 6', no losses, 0 samples/s)
    monkeypatch.setenv(FAULT_SIGKILL_RANK, f"1@5,1@{SHORT_RUN_STEPS}")
    run = tmp_path / "run"
    summary = train(
        config(short_dataset), str(run), num_workers=2, launcher="local", max_restarts=2
    )
    check_healed(run, summary, short_reference, restarts=2)
    assert summary.samples_per_s > 0 and summary.latest_checkpoint == f"step_{SHORT_RUN_STEPS:08d}"
    out = capfd.readouterr().out
    assert "[kiln] rank 1 exited with code -9 at " in out
    assert "restarting from step_00000004 (restart 1 of 2)" in out
    assert f"restarting from step_{SHORT_RUN_STEPS:08d} (restart 2 of 2)" in out
    assert f"nothing to train: attempt 2 had already trained to step {SHORT_RUN_STEPS}" in out


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
