"""`kiln experiment` end to end at the smallest size: a planted pool, a baseline and a pruned
arm (embed with a real tiny CLIP -> SemDeDup -> CLIP score), each trained 4 steps (local
launcher, one rank), evaluated, compared; a rerun reuses every run.

It checks the orchestration, not that pruning wins (4 steps decide nothing): that is
`recipes/experiments/pruning.yaml`'s job (README: "Pruning experiment"). The `filter:` step
(a third curate + train) is left out to keep this near a minute on 2 shared cores; the
shipped experiment runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kiln.models.build import build_model
from kiln.models.config import ModelConfig
from kiln.platform.comparison import COMPARISON_JSON, COMPARISON_MD
from kiln.platform.experiment import experiment
from kiln.training.evaluate import save_model_file
from tests.helpers_training import TINY_MODEL

pytestmark = pytest.mark.slow

STEPS = 4


def _write(tmp: Path) -> Path:
    cfg = ModelConfig.model_validate(TINY_MODEL)
    torch.manual_seed(0)
    model = save_model_file(str(tmp / "model.pt"), build_model(cfg).eval(), cfg, step=1)
    train = {
        "kind": "train",
        "name": "tiny",
        "run_dir": "unused",
        "resources": {"workers": 1, "launcher": "local"},
        "data": {"dataset": "unused", "batch_size": 8, "num_workers": 0, "shuffle_buffer": 16},
        "model": TINY_MODEL,
        "checkpoint": {"every_steps": STEPS},
        "max_steps": STEPS,
        "log_every": STEPS,
    }
    (tmp / "train.yaml").write_text(yaml.safe_dump(train))
    small = {"num_samples": 120, "num_eval": 16, "image_size": 16, "duplicate_fraction": 0.0}
    exp = {
        "kind": "experiment",
        "name": "tiny",
        "run_dir": "runs/exp",
        "pool": {**small, "plant": {"near_duplicates": 0.2, "mismatched": 0.2}},
        "train": {"recipe": "train.yaml"},
        "arms": [
            {"name": "baseline", "stages": [{"stage": "text", "drop_junk": True}]},
            {
                "name": "pruned",
                "stages": [
                    {"stage": "text", "drop_junk": True},
                    {"stage": "embed", "model": model},
                    {"stage": "semdedup", "num_clusters": 4, "eps": 0.05},
                    {"stage": "clip_score", "top_fraction": 0.7},
                ],
            },
        ],
        "ray": {"num_cpus": 2},
    }
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def test_tiny_experiment_end_to_end_and_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path)
    doc = experiment(path)
    run = tmp_path / "runs" / "exp"
    assert json.loads((run / COMPARISON_JSON).read_text()) == doc
    baseline, pruned = doc["arms"]
    assert doc["planted"] == {
        "near_duplicates": 24,
        "mismatched": 24,
        "ground_truth": str(run / "pool" / "planted.json"),
    }
    for arm in (baseline, pruned):
        assert (arm["steps"], arm["samples_per_step"]) == (STEPS, 8)  # equal compute
        assert arm["eval"]["step"] == STEPS
        assert 0 <= arm["eval"]["zero_shot"]["color"]["top1"] <= 1
        assert arm["rows_in"] == 144
        assert arm["rows_in"] == arm["rows_kept"] + sum(arm["dropped_by_reason"].values())
    assert baseline["duplicates"] is None and baseline["mismatches"] is None
    dups, mis = pruned["duplicates"], pruned["mismatches"]
    assert dups["planted"] == 24 and mis["planted"] == 24
    assert dups["removed"] == pruned["dropped_by_reason"].get("semantic_duplicate", 0)
    assert mis["removed"] == pruned["dropped_by_reason"]["low_clip_score"] > 0
    assert pruned["rows_kept"] < baseline["rows_kept"]
    assert doc["filter_eval"] is None
    md = (run / COMPARISON_MD).read_text()
    assert "| baseline | " in md and "| pruned | " in md
    out = capsys.readouterr().out
    assert "dup P / R" in out and "[kiln] comparison written to" in out
    page = (run / "report.html").read_text()  # the comparison is in the run's report too
    assert "<h2>Comparison of the arms (equal compute)</h2>" in page
    assert "<td>baseline</td>" in page and "<td>pruned</td>" in page
    assert "<h3>color top1</h3>" in page and "<svg" in page

    again = experiment(path)  # every run is complete: reused, same numbers
    assert [a["eval"] for a in again["arms"]] == [a["eval"] for a in doc["arms"]]
    assert capsys.readouterr().out.count("trained and evaluated already") == 2
