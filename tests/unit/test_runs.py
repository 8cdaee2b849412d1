"""Run directories: status files, listing, and the plain-text tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.platform.runs import format_runs, last_metrics, list_runs, read_status, write_status
from kiln.platform.tables import format_table


def test_status_merges_fields(tmp_path: Path) -> None:
    write_status(tmp_path, "running", kind="train", name="a", max_steps=10)
    write_status(tmp_path, "completed", last_step=10)
    s = read_status(tmp_path)
    assert s["state"] == "completed" and s["kind"] == "train" and s["last_step"] == 10


def test_list_runs_reads_metrics_and_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "exp" / "train"
    write_status(run, "stopped", kind="train", name="t", max_steps=40)
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 19, "loss": 1.0}) + "\n" + json.dumps({"step": 20, "loss": 0.9}) + "\n"
    )
    ckpt = run / "checkpoints"
    (ckpt / "step_00000020").mkdir(parents=True)
    (ckpt / "step_00000020" / "COMPLETE").write_text("{}")
    (ckpt / "latest").write_text("step_00000020\n")
    write_status(tmp_path / "cur", "completed", kind="curate", samples_in=10, samples_out=4)
    runs = {r.name: r for r in list_runs(tmp_path)}
    assert runs["t"].last_step == 20 and runs["t"].latest_checkpoint == "step_00000020"
    assert runs["t"].state == "stopped"
    assert "10 in -> 4 kept" in runs["cur"].summary
    text = format_runs(list(runs.values()))
    assert "20/40" in text and "step_00000020" in text


def test_incomplete_checkpoint_is_not_reported(tmp_path: Path) -> None:
    write_status(tmp_path, "failed", kind="train", name="t")
    (tmp_path / "checkpoints" / "step_00000005").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000005")
    assert list_runs(tmp_path)[0].latest_checkpoint is None


def test_last_metrics_skips_torn_line(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 3, "loss": 1.5}\n{"step": 4, "lo')
    assert last_metrics(tmp_path) == {"step": 3, "loss": 1.5}


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        list_runs(tmp_path / "nope")


def test_format_table_aligns() -> None:
    out = format_table(("a", "bb"), [(1, None), ("long", 2)]).splitlines()
    assert out[0] == "a     bb"
    assert out[2] == "1     -"
    assert out[3] == "long  2"
