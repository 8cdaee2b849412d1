"""`kiln train/curate/eval --dry-run`: the checks a job makes before it starts Ray, alone.

Each case runs the real CLI in a fresh interpreter that then reports whether Ray was even
imported and what the run dir holds: a dry run must start nothing and write nothing, and
a bad recipe must fail with exit code 2 and a message naming the fix.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers_datasets import write_tiny_dataset

REPO = Path(__file__).resolve().parents[2]

#: Runs `kiln ARGS...` in-process, then prints a JSON line: exit code, whether `ray` was
#: imported, whether the run dir exists.
_PROBE = """
import json, os, sys
from kiln.platform.cli import main
rc = main(sys.argv[2:])
print(json.dumps({"rc": rc, "ray": "ray" in sys.modules, "run_dir": os.path.exists(sys.argv[1])}))
"""


def dry_run(run_dir: Path, *args: str, cwd: Path = REPO) -> tuple[dict[str, object], str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(run_dir), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report, proc.stdout, proc.stderr


def write_recipe(folder: Path, data: dict[str, object], name: str = "recipe.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def train_recipe(dataset: str, **extra: object) -> dict[str, object]:
    return {
        "kind": "train",
        "name": "t",
        "run_dir": "runs/t",
        "resources": {"workers": 1, "cpus_per_worker": 1, "launcher": "ray"},
        "data": {"dataset": dataset, "batch_size": 4, "num_workers": 0},
        "model": {"flavor": "clip-tiny"},
        "max_steps": 2,
        **extra,
    }


def test_train_dry_run_catches_a_missing_dataset_without_ray(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "project", train_recipe("data/missing"))
    report, _, err = dry_run(tmp_path / "project/runs/t", "train", str(recipe), "--dry-run")
    assert report == {"rc": 2, "ray": False, "run_dir": False}
    missing = tmp_path / "project/data/missing/manifest.json"
    assert f"no dataset manifest at '{missing}'" in err
    assert (
        f"data.dataset: 'data/missing' in {recipe} is resolved against the recipe's folder "
        f"{tmp_path / 'project'}" in err
    )
    assert "Traceback" not in err


def test_train_dry_run_passes_on_a_good_recipe_and_writes_nothing(tmp_path: Path) -> None:
    write_tiny_dataset(tmp_path / "project" / "data" / "tiny", num_samples=26)
    recipe = write_recipe(tmp_path / "project", train_recipe("data/tiny"))
    # run from elsewhere: the recipe's relative paths do not depend on the cwd
    (tmp_path / "elsewhere").mkdir()
    report, out, err = dry_run(
        tmp_path / "project/runs/t", "train", str(recipe), "--dry-run", cwd=tmp_path / "elsewhere"
    )
    assert report == {"rc": 0, "ray": False, "run_dir": False}, err
    assert "recipe OK: train 't'" in out
    assert f"dataset {tmp_path / 'project/data/tiny'}: 26 samples in 2 shards" in out


def test_train_dry_run_refuses_resources_the_machine_does_not_have(tmp_path: Path) -> None:
    write_tiny_dataset(tmp_path / "data", num_samples=26)
    recipe = write_recipe(
        tmp_path,
        train_recipe(str(tmp_path / "data"), ray={"num_cpus": 2}),
    )
    report, _, err = dry_run(
        tmp_path / "runs/t", "train", str(recipe), "--dry-run", "--set", "resources.workers=3"
    )
    assert report == {"rc": 2, "ray": False, "run_dir": False}
    assert "need 3 CPUs but the embedded Ray (ray.num_cpus=2) has 2" in err
    assert "lower resources.workers or resources.cpus_per_worker, or raise ray.num_cpus" in err


def test_train_dry_run_names_a_bad_flavor(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, train_recipe("data"))
    report, _, err = dry_run(
        tmp_path / "runs/t",
        "train",
        str(recipe),
        "--dry-run",
        "--set",
        "model.flavor=clip-vit-b-61",
    )
    assert report == {"rc": 2, "ray": False, "run_dir": False}
    assert "unknown model flavor 'clip-vit-b-61': did you mean 'clip-vit-b-16'" in err


def test_train_dry_run_checks_the_dataset_holds_a_global_batch(tmp_path: Path) -> None:
    write_tiny_dataset(tmp_path / "data", num_samples=13)
    recipe = write_recipe(tmp_path, train_recipe(str(tmp_path / "data")))
    report, _, err = dry_run(
        tmp_path / "runs/t", "train", str(recipe), "--dry-run", "--set", "data.batch_size=32"
    )
    assert report["rc"] == 2 and report["ray"] is False
    assert "fewer than one global batch" in err


def curate_recipe(**input_fields: object) -> dict[str, object]:
    return {
        "kind": "curate",
        "name": "c",
        "run_dir": "runs/c",
        "input": {"format": "csv", "paths": ["pool/captions.csv"], **input_fields},
        "stages": [
            {"stage": "text"},
            {"stage": "metaclip_match", "entries": "entries.txt"},
            {"stage": "metaclip_balance", "t": 10},
        ],
        "execution": {"executor": "ray"},
    }


def test_curate_dry_run_catches_a_missing_input_path(tmp_path: Path) -> None:
    folder = tmp_path / "project"
    recipe = write_recipe(folder, curate_recipe())
    (folder / "entries.txt").write_text("dog\n")
    report, _, err = dry_run(folder / "runs/c", "curate", str(recipe), "--dry-run")
    assert report == {"rc": 2, "ray": False, "run_dir": False}
    assert f"input path '{folder / 'pool/captions.csv'}' does not exist" in err
    assert "input.paths: 'pool/captions.csv'" in err and "the recipe's folder" in err


def test_curate_dry_run_catches_a_missing_entries_file(tmp_path: Path) -> None:
    folder = tmp_path / "project"
    recipe = write_recipe(folder, curate_recipe())
    (folder / "pool").mkdir()
    (folder / "pool/captions.csv").write_text("text,url\na dog,http://x/1.jpg\n")
    report, _, err = dry_run(folder / "runs/c", "curate", str(recipe), "--dry-run")
    assert report == {"rc": 2, "ray": False, "run_dir": False}
    assert str(folder / "entries.txt") in err and "stages.1.entries: 'entries.txt'" in err

    (folder / "entries.txt").write_text("dog\n")
    report, out, err = dry_run(folder / "runs/c", "curate", str(recipe), "--dry-run")
    assert report == {"rc": 0, "ray": False, "run_dir": False}, err
    assert "plan: read -> text -> metaclip_match -> metaclip_balance -> shard" in out
    assert "input: 1 csv files" in out


def test_curate_dry_run_refuses_a_stage_bigger_than_ray(tmp_path: Path) -> None:
    folder = tmp_path / "project"
    data = curate_recipe()
    data["ray"] = {"num_cpus": 1}
    data["stages"][0]["resources"] = {"num_cpus": 4}  # type: ignore[index]
    recipe = write_recipe(folder, data)
    report, _, err = dry_run(folder / "runs/c", "curate", str(recipe), "--dry-run")
    assert report == {"rc": 2, "ray": False, "run_dir": False}
    assert "step text: a task needs 4 CPUs but the embedded Ray (ray.num_cpus=1) has 1" in err


def test_curate_dry_run_does_not_generate_a_synthetic_pool(tmp_path: Path) -> None:
    """The quickstart's recipe: its entries file is part of the pool it generates."""
    report, out, err = dry_run(
        tmp_path / "c",
        "curate",
        str(REPO / "recipes/quickstart/curate.yaml"),
        "--dry-run",
        "--set",
        f"run_dir={tmp_path / 'c'}",
        "--set",
        f"input.paths=[{tmp_path / 'pool'}]",
        "--set",
        f"stages.metaclip_match.entries={tmp_path / 'pool/metadata.txt'}",
    )
    assert report == {"rc": 0, "ray": False, "run_dir": False}, err
    assert f"input: a synthetic pool of 3000 rows, generated into {tmp_path / 'pool'}" in out
    assert not (tmp_path / "pool").exists()


def test_eval_dry_run_catches_a_missing_checkpoint(tmp_path: Path) -> None:
    write_tiny_dataset(tmp_path / "eval", num_samples=13)
    recipe = write_recipe(
        tmp_path,
        {
            "kind": "eval",
            "name": "e",
            "run_dir": "runs/e",
            "checkpoint": "runs/missing",
            "eval": {"retrieval": "eval"},
        },
    )
    report, _, err = dry_run(tmp_path / "runs/e", "eval", str(recipe), "--dry-run")
    assert report == {"rc": 2, "ray": False, "run_dir": False}
    assert f"'{tmp_path / 'runs/missing'}' does not exist" in err
    assert "checkpoint: 'runs/missing'" in err


@pytest.mark.parametrize("verb", ["curate", "train"])
def test_dry_run_of_the_wrong_kind_says_which_verb(verb: str, tmp_path: Path) -> None:
    other = "train" if verb == "curate" else "curate"
    report, _, err = dry_run(
        tmp_path / "x", verb, str(REPO / f"recipes/quickstart/{other}.yaml"), "--dry-run"
    )
    assert report["rc"] == 2 and f"kiln {other} " in err
