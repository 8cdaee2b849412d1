"""What a rerun of `kiln experiment` does with a train run dir that is already there: it
never removes a folder the experiment did not write, and it reuses a finished run only for
the same recipe and the same dataset bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.platform import experiment as exp_mod
from kiln.platform.recipes import TrainRecipe, load_recipe
from tests.helpers_datasets import write_tiny_dataset

REPO = Path(__file__).resolve().parents[2]


def _recipe(tmp_path: Path) -> TrainRecipe:
    dataset = write_tiny_dataset(tmp_path / "ds", num_samples=8)
    recipe = load_recipe(
        REPO / "recipes/quickstart/train.yaml",
        [f"run_dir={tmp_path / 'run'}", f"data.dataset={dataset}", "eval.zero_shot=null",
         "eval.retrieval=null"],
    )  # fmt: skip
    assert isinstance(recipe, TrainRecipe)
    return recipe


def test_a_folder_the_experiment_did_not_write_is_never_removed(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    run = Path(recipe.run_dir)
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a run of this experiment"):
        exp_mod._train_or_skip(recipe)
    assert (run / "notes.txt").read_text() == "mine"


def test_the_inputs_a_rerun_checks_change_with_the_dataset_bytes(tmp_path: Path) -> None:
    """A re-curated dataset at the same path (another manifest) is another input, so its
    arm is trained again (the integration test checks that the same inputs are reused)."""
    recipe = _recipe(tmp_path)
    first = exp_mod._inputs_id(recipe)
    assert exp_mod._inputs_id(recipe) == first
    manifest = Path(recipe.data.dataset) / "manifest.json"
    manifest.write_text(manifest.read_text() + "\n")
    changed = exp_mod._inputs_id(recipe)
    assert changed["recipe_hash"] == first["recipe_hash"]
    assert changed["dataset_manifest_sha256"] != first["dataset_manifest_sha256"]
    other = recipe.model_copy(update={"max_steps": 7})
    assert exp_mod._inputs_id(other)["recipe_hash"] != first["recipe_hash"]
