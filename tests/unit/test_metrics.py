"""`kiln.metrics`: metrics.jsonl and the TensorBoard event files hold the same numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.metrics import (
    METRICS_FILE,
    TENSORBOARD_DIR,
    memory_stats,
    read_metrics,
    scalars_of,
    write_metrics,
)
from kiln.platform.summary import curation_step_records


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every event file in `run_dir/tensorboard`, read back with
    TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_scalars_leave_out_what_is_no_measurement() -> None:
    record = {"step": 3, "attempt": 1, "resumed_from": None, "loss": 1.5, "ok": True, "n": 2}
    assert scalars_of(record) == {"loss": 1.5, "n": 2.0}


def test_curation_records_round_trip_to_tensorboard(tmp_path: Path) -> None:
    steps: dict[str, Any] = {
        "read": {"rows_in": 100, "rows_out": 97, "dropped": {"bad_encoding": 3}, "seconds": 0.5},
        "text": {"rows_in": 97, "rows_out": 90, "dropped": {"junk_text": 7}, "seconds": 0.0},
    }
    records = curation_step_records({"steps": steps})
    assert [r["name"] for r in records] == ["read", "text"] and records[0]["step"] == 1
    assert records[0]["rows_per_s"] == 200.0 and records[1]["rows_per_s"] is None
    assert records[1]["dropped_by_reason"] == {"junk_text": 7}
    (tmp_path / TENSORBOARD_DIR).mkdir()
    (tmp_path / TENSORBOARD_DIR / "events.out.tfevents.old").write_bytes(b"")  # a rerun's
    write_metrics(str(tmp_path), records)
    assert read_metrics(str(tmp_path)) == records
    assert len(list((tmp_path / TENSORBOARD_DIR).iterdir())) == 1  # replaced, not added to
    scalars = tensorboard_scalars(tmp_path)
    assert scalars["rows_out"] == {1: 97.0, 2: 90.0}
    assert scalars["dropped"] == {1: 3.0, 2: 7.0}
    assert scalars["rows_per_s"] == {1: 200.0}


def test_read_metrics_skips_a_torn_line(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text(json.dumps({"step": 1}) + '\n{"step": 2, "lo')
    assert read_metrics(str(tmp_path)) == [{"step": 1}]
    assert read_metrics(str(tmp_path / "none")) == []


def test_memory_is_this_process_rss() -> None:
    blob = bytearray(64 << 20)  # 64 MiB, touched
    for i in range(0, len(blob), 4096):
        blob[i] = 1
    stats = memory_stats()
    assert set(stats) == {"rss_mb"} and stats["rss_mb"] > 64
    del blob


def test_an_evaluation_is_one_record_of_its_scalars(tmp_path: Path) -> None:
    """An eval run's metrics: one record at the checkpoint's step, in metrics.jsonl and
    TensorBoard alike; a train run's end-of-training eval goes to its TensorBoard only."""
    from kiln.platform.api import _report
    from kiln.platform.runs import write_status
    from kiln.platform.summary import eval_record

    result = {
        "step": 6,
        "model_file": "x/model.pt",
        "zero_shot": {"color": {"top1": 0.5, "chance": 0.125, "per_class": {"red": 1.0}}},
        "retrieval": {"num_samples": 64, "image_to_text": {"recall@5": 0.25}},
    }
    record = eval_record(result)
    assert record == {
        "step": 6,
        "eval/zero_shot/color/top1": 0.5,
        "eval/zero_shot/color/per_class/red": 1.0,
        "eval/retrieval/image_to_text/recall@5": 0.25,
    }
    evaluated = tmp_path / "eval"
    write_status(evaluated, "completed", kind="eval", name="e", eval=result)
    _report(evaluated, [record])
    assert read_metrics(str(evaluated)) == [record]
    assert tensorboard_scalars(evaluated)["eval/zero_shot/color/top1"] == {6: 0.5}
    assert "<h2>Evaluation</h2>" in (evaluated / "report.html").read_text()

    trained = tmp_path / "train"
    write_status(trained, "completed", kind="train", name="t")
    (trained / METRICS_FILE).write_text(json.dumps({"step": 6, "loss": 1.0}) + "\n")
    _report(trained, eval_result=result)
    assert read_metrics(str(trained)) == [{"step": 6, "loss": 1.0}]
    assert tensorboard_scalars(trained)["eval/retrieval/image_to_text/recall@5"] == {6: 0.25}
