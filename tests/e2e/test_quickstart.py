"""`kiln quickstart` end to end, shrunk: the demo's whole path and its exit code."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.test_cli import kiln


def test_quickstart_small(tmp_path: Path) -> None:
    root = tmp_path / "qs"
    sets = {
        "max_steps": 6,
        "checkpoint.every_steps": 2,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "model.vision.image_size": 16,
        "model.vision.layers": 1,
        "model.text.layers": 1,
        "log_every": 2,
    }
    args = ["quickstart", "--root", str(root)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    out = kiln(*args).stdout
    assert "resume is exact: 3/3 steps after step 3 bitwise equal" in out
    for line in ("samples in (raw pool)", "zero-shot color top1", "resume vs reference  "):
        assert line in out
    report = (root / "report.html").read_text()
    assert "Resume check" in report and "Balancing: head entries" in report
    status = json.loads((root / "train" / "status.json").read_text())
    assert status["state"] == "completed" and status["last_step"] == 6
    # (a second quickstart clears only its own previous run: test_quickstart_report.py)
