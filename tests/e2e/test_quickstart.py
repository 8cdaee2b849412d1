"""`kiln quickstart` end to end, shrunk: the demo's whole path and its exit code."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.e2e.test_cli import KILN, REPO
from tests.helpers_output import library_lines


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
    # as a user redirects it: stdout and stderr into one file
    out_file = tmp_path / "quickstart.out"
    with open(out_file, "w") as f:
        proc = subprocess.run(
            [*KILN, *args],
            cwd=REPO,
            env={**os.environ, "DS_ACCELERATOR": "cpu"},
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    out = out_file.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "resume is exact: 3/3 steps after step 3 bitwise equal" in out
    # kiln's lines are the output: Ray's and DeepSpeed's went to each run's logs/
    lines = [ln for ln in out.splitlines() if ln.strip()]
    noise = library_lines(out)
    assert len(noise) < 0.2 * len(lines), "\n".join(noise[:60])
    assert "Traceback" not in out and "\x1b[" not in out
    assert lines[-1].startswith(f"outputs in {root}: report {root / 'report.html'}")
    run_logs = "".join(p.read_text() for p in (root / "train" / "logs").glob("kiln-*.log"))
    assert "(RayTrainWorker pid=" in run_logs and "[kiln] step 6/6" in run_logs
    assert "\x1b[" not in run_logs
    # each run's Ray is its own: its workers never look for "the" Ray on the machine
    assert "Found multiple active Ray instances" not in run_logs
    for line in ("samples in (raw pool)", "zero-shot color top1", "resume vs reference  "):
        assert line in out
    report = (root / "report.html").read_text()
    assert "Resume check" in report and "Balancing: head entries" in report
    status = json.loads((root / "train" / "status.json").read_text())
    assert status["state"] == "completed" and status["last_step"] == 6
    # (a second quickstart clears only its own previous run: test_quickstart_report.py)
