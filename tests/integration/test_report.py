"""Metrics and reports of real runs: a small curation (local executor) and the session's
short reference training run. The metrics files equal their TensorBoard event files, the
report is written at the end of the job, and it renders in headless Chromium with no
console errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kiln.metrics import METRICS_FILE, read_metrics
from kiln.platform.report import write_run_report
from kiln.platform.runs import write_status
from tests.unit.test_metrics import tensorboard_scalars

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = (
    "headless Chromium is not installed: `sudo apt-get install -y --no-install-recommends "
    "chromium` (Debian/Ubuntu; `make test` installs it when it runs as root)"
)


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-row synthetic pool curated with the quickstart's plan (local executor): drops
    of every kind, balancing, shards; returns the run dir."""
    from kiln.platform import api

    root = tmp_path_factory.mktemp("report")
    pool = root / "pool"
    recipe: dict[str, Any] = {
        "kind": "curate",
        "name": "report-curate",
        "run_dir": str(root / "curate"),
        "input": {
            "format": "synthetic",
            "paths": [str(pool)],
            "synthetic": {"num_samples": 400, "num_eval": 0, "image_size": 32, "seed": 0},
        },
        "stages": [
            {"stage": "text", "drop_junk": True},
            {"stage": "text_dedup"},
            {"stage": "metaclip_match", "entries": str(pool / "metadata.txt")},
            {"stage": "metaclip_balance", "t": 10, "seed": 0},
            {"stage": "image", "min_size": 16},
            {"stage": "image_dedup"},
        ],
        "shard": {"samples_per_shard": 64},
        "execution": {"executor": "local"},
    }
    api.curate(recipe)
    return root / "curate"


def _render(page: Path, tmp: Path) -> tuple[Path, list[str]]:
    """Screenshot `page` in headless Chromium; returns the PNG and the console lines."""
    if CHROMIUM is None:
        pytest.skip(NO_CHROMIUM)
    shot = tmp / f"{page.parent.name}.png"
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp / 'chromium-profile'}",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-3000:]
    # every console message (console.error, an uncaught exception, a resource that failed
    # to load) is logged as `...:CONSOLE(line)] "message", source: ...`
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
    return shot, console


def _colours(png: Path) -> int:
    from PIL import Image

    with Image.open(png) as im:
        return len(im.convert("RGB").getcolors(maxcolors=1 << 20) or [])


def test_curation_metrics_and_report(curated: Path) -> None:
    records = read_metrics(str(curated))
    names = [r["name"] for r in records]
    assert names == list(json.loads((curated / "curation_stats.json").read_text())["steps"])
    assert [r["step"] for r in records] == list(range(1, len(names) + 1))
    scalars = tensorboard_scalars(curated)
    for field in ("rows_in", "rows_out", "dropped", "seconds"):
        assert scalars[field] == pytest.approx({r["step"]: r[field] for r in records})

    page = (curated / "report.html").read_text()  # written by the job itself
    for title in (
        "Curation funnel",
        "Curation: dropped rows by reason",
        "Curation steps: rows and time",
        "Entry counts before / after balancing (log-log)",
        "Balancing: head entries",
        "Kept samples",
        "Rejected samples (with the reason)",
    ):
        assert f"<h2>{title}</h2>" in page, title
    assert "Loss" not in page and "Evaluation" not in page  # a curate run has neither
    kept, rejected = page.split("<h2>Rejected samples")
    assert kept.count("data:image/jpeg;base64,") == 12
    # rejected rows keep no image bytes: read back from the pool by source / source_row
    assert rejected.count("data:image/jpeg;base64,") >= 6
    for reason in ("not_sampled", "junk_text", "bad_image"):
        assert f"<b>{reason}</b>" in rejected


def test_training_metrics_equal_their_tensorboard_events(short_reference_run: Path) -> None:
    records = read_metrics(str(short_reference_run))
    assert records and all(
        {"loss", "lr", "samples_per_s", "grad_norm", "data_wait_s", "step_s", "rss_mb"} <= set(r)
        for r in records
    )
    assert all(r["grad_norm"] > 0 and 0 <= r["data_wait_s"] <= r["step_s"] for r in records)
    scalars = tensorboard_scalars(short_reference_run)
    for field in ("loss", "lr", "samples_per_s", "grad_norm", "data_wait_s", "rss_mb"):
        expected = {r["step"]: r[field] for r in records}
        assert scalars[field] == pytest.approx(expected, rel=1e-6), field  # stored as float32


def test_reports_render_in_chromium(
    curated: Path, short_reference_run: Path, tmp_path: Path
) -> None:
    train = tmp_path / "train"  # the shared run stays as it is: a copy of what reports read
    train.mkdir()
    shutil.copy(short_reference_run / METRICS_FILE, train / METRICS_FILE)
    write_status(train, "completed", kind="train", name="short", max_steps=6, last_step=6)
    train_page = Path(write_run_report(str(train)))
    assert "<h2>Gradient norm (before clipping)</h2>" in train_page.read_text()
    for page in (curated / "report.html", train_page):
        shot, console = _render(page, tmp_path)
        assert not console, "\n".join(console)
        assert _colours(shot) > 50, f"{shot} is (nearly) blank"


def test_kiln_report_cli(curated: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    (curated / "report.html").unlink()
    ok = subprocess.run(
        [sys.executable, "-m", "kiln", "report", str(curated)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.strip() == f"report: {curated / 'report.html'}"
    assert (curated / "report.html").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "kiln", "report", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "is not a kiln run dir (no status.json)" in bad.stderr
