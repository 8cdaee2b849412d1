"""Quickstart's loss comparison and the HTML report (pure parts, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.platform.quickstart import compare_losses, read_losses
from kiln.platform.report import (
    html_table,
    render_report,
    svg_bars,
    svg_lines,
    write_run_report,
)
from kiln.platform.summary import eval_rows, format_result


def test_read_losses_keeps_the_redone_value(tmp_path: Path) -> None:
    lines = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5},
        {"step": 2, "loss": 1.25},  # redone after a resume: the finished run used this one
    ]
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps(x) for x in lines) + '\n{"step": 3, "lo'
    )
    assert read_losses(tmp_path) == {1: 2.0, 2: 1.25}


def test_compare_losses_is_bitwise() -> None:
    ref = {1: 1.0, 2: 0.5, 3: 0.25}
    rows, exact = compare_losses(ref, {2: 0.5, 3: 0.25}, after_step=1)
    assert exact and [r[0] for r in rows] == [2, 3]
    rows, exact = compare_losses(ref, {2: 0.5, 3: 0.25 + 1e-12}, after_step=1)
    assert not exact and rows[-1][3] is False
    _, exact = compare_losses(ref, {2: 0.5}, after_step=1)  # a missing step is a mismatch
    assert not exact
    _, exact = compare_losses(ref, ref, after_step=3)  # nothing to compare is not a pass
    assert not exact


def test_report_pieces_escape_and_draw(tmp_path: Path) -> None:
    svg = svg_lines({"a": {1: 2.0, 2: 1.0}, "b": {1: 2.0, 2: 1.5}})
    assert svg.count("<polyline") == 2
    # log-log: points at 0 cannot be drawn and are left out; a grid line per decade
    log = svg_lines({"before": {1: 1000.0, 2: 100.0, 3: 0.0}}, log=True)
    assert log.count("<polyline") == 1 and log.count(",") == 2 and ">1000<" in log
    assert svg_lines({"a": {}}) == "<p>no data</p>"
    bars = svg_bars([("bad_image", 30.0), ("junk_text", 10.0)])
    assert bars.count("<rect") == 2 and ">bad_image<" in bars
    url = render_report(
        str(tmp_path / "r" / "report.html"),
        "t <x>",
        [html_table(("k", "v"), [("a", None), ("<b>", 2)])],
    )
    page = Path(url).read_text()
    assert "<title>t &lt;x&gt;</title>" in page
    assert "<td>a</td><td>-</td>" in page and "<td>&lt;b&gt;</td><td>2</td>" in page


def test_run_report_of_a_train_run(tmp_path: Path) -> None:
    """Sections come from the files the run has: curves from metrics.jsonl, tables from
    eval.json; no curation section without curation_stats.json."""
    from kiln.platform.runs import write_status

    write_status(tmp_path, "completed", kind="train", name="t", max_steps=3)
    records = [
        {"step": s, "loss": 3.0 - s, "lr": 1e-3, "samples_per_s": 10.0 * s, "rss_mb": 100.0}
        for s in (1, 2, 3)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    color = {"top1": 0.5, "top5": 0.9, "chance": 0.125, "per_class": {"red": 0.75, "blue": 0.25}}
    retrieval = {"num_samples": 64, "image_to_text": {"recall@1": 0.1, "recall@5": 0.3}}
    (tmp_path / "eval.json").write_text(
        json.dumps({"zero_shot": {"color": color}, "retrieval": retrieval})
    )
    page = Path(write_run_report(str(tmp_path))).read_text()
    for title in ("Loss", "Learning rate", "Throughput (samples/s)", "Memory (MiB)"):
        assert f"<h2>{title}</h2>" in page
    assert "Gradient norm" not in page and "Curation" not in page  # no data, no section
    assert "<td>zero-shot color top1</td><td>0.500</td><td>chance 0.125</td>" in page
    per_class = page.split("<h3>Zero-shot color: top-1 accuracy per class")[1]
    assert per_class.index(">blue<") < per_class.index(">red<") and ">0.75<" in per_class
    assert "<h3>Retrieval: recall@k</h3>" in page
    assert "<td>state</td><td>completed</td>" in page


def test_report_of_a_folder_that_is_no_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a kiln run dir"):
        write_run_report(str(tmp_path))


def test_eval_rows_report_chance() -> None:
    result = {
        "zero_shot": {"color": {"top1": 0.5, "top5": 0.9, "chance": 0.125}},
        "retrieval": {"num_samples": 100, "image_to_text": {"recall@1": 0.1, "recall@10": 0.4}},
    }
    rows = eval_rows(result)
    assert ("zero-shot color top1", "0.500", "chance 0.125") in rows
    assert ("zero-shot color top5", "0.900", "chance 0.625") in rows
    assert rows[-1] == ("image to text recall@10", "0.400", "chance 0.100")
    assert "zero-shot color top1" in format_result(result)


def test_rerun_clears_only_its_own_training_runs(tmp_path: Path) -> None:
    import pytest

    from kiln.platform.quickstart import _clear_previous_run
    from kiln.platform.runs import write_status

    ours = tmp_path / "train"
    write_status(ours, "completed", kind="train", name="quickstart-clip")
    (ours / "checkpoints").mkdir()
    _clear_previous_run(ours, "quickstart-clip")
    assert not ours.exists()

    theirs = tmp_path / "data"
    theirs.mkdir()
    (theirs / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a quickstart training run"):
        _clear_previous_run(theirs, "quickstart-clip")
    assert (theirs / "precious.txt").exists()


def test_curation_summary_adds_up_in_plan_order() -> None:
    """Every drop reason of every step, in plan order, between samples in and out; no
    dedup row when nothing deduplicated."""
    from kiln.platform.summary import format_curation, funnel_rows

    steps = {
        "read": {"rows_in": 100, "rows_out": 97, "dropped": {"bad_encoding": 3}},
        "text": {"rows_in": 97, "rows_out": 90, "dropped": {"junk_text": 5, "empty_text": 2}},
        "metaclip_balance": {"rows_in": 90, "rows_out": 60, "dropped": {"not_sampled": 30}},
        "image": {"rows_in": 60, "rows_out": 59, "dropped": {"bad_image": 1, "x": 0}},
    }
    result = {"samples_in": 100, "samples_out": 59, "deduped": 0, "steps": steps}
    rows = funnel_rows(result)
    assert rows == [
        ("samples in", 100),
        ("- read: bad_encoding", -3),
        ("- text: empty_text", -2),
        ("- text: junk_text", -5),
        ("- metaclip_balance: not_sampled", -30),
        ("- image: bad_image", -1),
        ("samples out", 59),
    ]
    assert sum(int(v) for _, v in rows[:-1]) == rows[-1][1]  # type: ignore[call-overload]
    text = format_curation(result)
    assert "exact duplicates" not in text and "image: bad_image" in text


def test_small_chance_levels_are_not_printed_as_zero() -> None:
    result = {"retrieval": {"num_samples": 5000, "image_to_text": {"recall@1": 0.01}}}
    assert eval_rows(result) == [("image to text recall@1", "0.010", "chance 0.0002")]


def test_a_report_that_fails_does_not_fail_the_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The end of a job: its results are on disk; a report that cannot be written is said,
    with the command to retry, and raises nothing."""
    from kiln.platform.api import _report

    _report(tmp_path)  # no status.json: write_run_report raises, _report says it
    out = capsys.readouterr().out
    assert out.startswith("[kiln] could not write the metrics or report.html of ")
    assert f"`kiln report {tmp_path}`" in out and not (tmp_path / "report.html").exists()


def test_per_class_accuracy_of_a_class_without_eval_samples_is_no_bar() -> None:
    """A tiny held-out set can miss a class: its per-class accuracy is None (found by a
    4-step experiment arm, whose report failed on float(None))."""
    from kiln.platform.report import eval_sections

    result = {"zero_shot": {"color": {"top1": 0.5, "chance": 0.5,
                                      "per_class": {"red": 1.0, "blue": 0.0, "teal": None}}}}  # fmt: skip
    page = "".join(eval_sections(result))
    assert ">red</text>" in page and ">blue</text>" in page and ">teal</text>" not in page


def test_experiment_report_shows_the_comparison(tmp_path: Path) -> None:
    """A `kiln experiment` run dir (comparison.json, no status.json) gets a report with the
    arms' table and one bar chart per eval metric."""
    from kiln import storage
    from kiln.platform.comparison import COMPARISON_JSON

    ev = {"zero_shot": {"color": {"top1": 0.2, "chance": 0.125}}, "retrieval": {"num_samples": 40}}
    arm = {"rows_kept": 90, "steps": 4, "samples_per_step": 8, "eval": ev}
    doc = {
        "name": "exp", "pool": {"num_samples": 100, "seed": 0}, "planted": {},
        "eval_samples": 40, "steps": 4, "samples_per_step": 8, "batch_size": 4, "workers": 2,
        "duplicate_reasons": ["semantic_duplicate"], "mismatch_reasons": ["low_clip_score"],
        "seconds": 12.0,
        "arms": [{**arm, "name": "baseline"},
                 {**arm, "name": "pruned", "rows_kept": 70,
                  "duplicates": {"precision": 0.5, "recall": 0.25}}],
    }  # fmt: skip
    storage.write_json(str(tmp_path / COMPARISON_JSON), doc)
    page = Path(write_run_report(str(tmp_path))).read_text()
    assert "<title>kiln experiment: exp</title>" in page
    assert "<td>pruned</td><td>70</td><td>4 x 8</td><td>0.200</td>" in page
    assert "<td>0.500 / 0.250</td>" in page
    assert "<h3>color top1</h3>" in page and "<h3>dup P / R</h3>" not in page
