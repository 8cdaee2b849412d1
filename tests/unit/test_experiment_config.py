"""The `kind: experiment` recipe: the shipped one loads, mistakes are named with their fix,
`${...}` variables expand, and the comparison table reads its document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.platform.comparison import comparison_markdown, comparison_rows
from kiln.platform.experiment_config import load_experiment, parse_experiment, substitute
from kiln.platform.recipes import RecipeError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "recipes" / "experiments" / "pruning.yaml"


def _minimal(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "kind": "experiment",
        "name": "t",
        "run_dir": "out",
        "pool": {"num_samples": 100, "plant": {"near_duplicates": 0.1, "mismatched": 0.1}},
        "train": {"recipe": "train.yaml", "set": ["max_steps=5"]},
        "arms": [
            {"name": "baseline", "stages": [{"stage": "text"}]},
            {"name": "pruned", "stages": [{"stage": "text"}, {"stage": "clip_score"}]},
        ],
    }
    doc.update(changes)
    return doc


def test_the_shipped_experiment_loads_with_absolute_paths() -> None:
    exp = load_experiment(SHIPPED)
    assert exp.run_dir == str(REPO / "runs" / "experiments" / "pruning")
    assert exp.train.recipe == str(REPO / "recipes" / "quickstart" / "train.yaml")
    assert Path(exp.train.recipe).is_file()
    assert [a.name for a in exp.arms] == ["baseline", "pruned"]
    embed = next(s for s in exp.arms[1].stages if s["stage"] == "embed")
    assert embed["model"] == f"{exp.run_dir}/filter/train"  # ${filter}, expanded
    assert exp.pool.plant is not None and exp.filter is not None
    assert exp.filter.pool.plant is None  # the filter's pool is clean


def test_the_ablation_extends_the_experiment_so_its_runs_are_reused() -> None:
    base = load_experiment(SHIPPED)
    ablation = load_experiment(SHIPPED.with_name("pruning_ablation.yaml"))
    assert ablation.run_dir == base.run_dir
    assert ablation.model_dump(exclude={"arms"}) == base.model_dump(exclude={"arms"})
    assert ablation.arms[:2] == base.arms
    assert [a.name for a in ablation.arms[2:]] == ["semdedup_only", "clip_score_only"]


def test_overrides_apply_and_their_paths_are_relative_to_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    exp = load_experiment(SHIPPED, ["pool.num_samples=500", "train.set=[max_steps=7]"])
    assert exp.pool.num_samples == 500 and exp.train.set == ["max_steps=7"]
    moved = load_experiment(SHIPPED, ["run_dir=runs/other"])
    assert moved.run_dir == str(tmp_path / "runs" / "other")
    embed = next(s for s in moved.arms[1].stages if s["stage"] == "embed")
    assert embed["model"] == str(tmp_path / "runs" / "other" / "filter" / "train")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arms": [{"name": "a", "stages": []}]}, "at least two"),
        (
            {"arms": [{"name": "a", "stages": []}, {"name": "a", "stages": []}]},
            "used twice: give each arm its own name",
        ),
        (
            {
                "arms": [
                    {"name": "a", "stages": [{"stage": "embed", "model": "${filter}"}]},
                    {"name": "b", "stages": []},
                ]
            },
            "no `filter:` section",
        ),
        ({"train": {"recipe": "t.yaml", "set": ["run_dir=x"]}}, "remove that override"),
        ({"arms": [{"name": "a b", "stages": []}, {"name": "c", "stages": []}]}, "folder name"),
        ({"trian": {}}, "unknown field 'trian': did you mean 'train'?"),
        ({"pool": {"num_sampels": 5}}, "unknown field 'pool.num_sampels': did you mean"),
        ({"kind": "train"}, "runs `kind: experiment` recipes"),
    ],
)
def test_mistakes_are_named_with_their_fix(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match="^experiment: .*" + _escape(message)):
        parse_experiment(_minimal(**changes))


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_a_missing_section_is_named() -> None:
    doc = _minimal()
    del doc["train"]
    with pytest.raises(RecipeError, match="field 'train' is required"):
        parse_experiment(doc)


def test_substitute_and_unknown_variables() -> None:
    values = {"run_dir": "/r", "pool": "/r/pool", "filter": "/r/filter/train"}
    assert substitute({"a": ["${filter}/x", 3]}, values) == {"a": ["/r/filter/train/x", 3]}
    with pytest.raises(RecipeError, match=r"\$\{pol\}.*\$\{pool\}"):
        substitute("${pol}/eval", values)


def test_a_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_experiment(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [experiment\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_experiment(bad)


def test_relative_stage_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    doc = _minimal()
    doc["arms"][1]["stages"] = [{"stage": "clip_score", "top_fraction": 0.5, "uids_out": "k.npy"}]
    path = tmp_path / "sub" / "exp.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(doc))
    exp = load_experiment(path)
    assert exp.arms[1].stages[0]["uids_out"] == str(tmp_path / "sub" / "k.npy")
    assert exp.run_dir == str(tmp_path / "sub" / "out")


def test_comparison_table_and_markdown() -> None:
    arm = {
        "name": "baseline",
        "rows_kept": 100,
        "steps": 10,
        "samples_per_step": 64,
        "eval": {
            "zero_shot": {"color": {"top1": 0.25, "chance": 0.125}},
            "retrieval": {"num_samples": 40},
        },
        "duplicates": None,
        "mismatches": None,
    }
    pruned = {
        **arm,
        "name": "pruned",
        "rows_kept": 60,
        "duplicates": {"precision": 0.5, "recall": 0.25},
        "mismatches": {"precision": None, "recall": 1.0},
    }
    doc = {
        "name": "t",
        "arms": [arm, pruned],
        "pool": {"num_samples": 100, "seed": 0},
        "planted": {"near_duplicates": 10, "mismatched": 5},
        "eval_samples": 40,
        "steps": 10,
        "batch_size": 32,
        "workers": 2,
        "samples_per_step": 64,
        "duplicate_reasons": ["semantic_duplicate"],
        "mismatch_reasons": ["low_clip_score"],
        "seconds": 12.0,
    }
    header, rows = comparison_rows(doc)
    assert header[:4] == ["arm", "rows kept", "steps x samples", "color top1"]
    assert rows[0][:5] == ["baseline", "100", "10 x 64", "0.250", "-"]
    assert rows[1][-2:] == ["0.500 / 0.250", "- / 1.000"]
    md = comparison_markdown(doc)
    assert "| pruned | 60 | 10 x 64 | 0.250 |" in md
    assert "10 planted near-duplicates, 5 planted mismatched captions" in md
    assert "Chance: color top1 0.125, R@5 0.125." in md
