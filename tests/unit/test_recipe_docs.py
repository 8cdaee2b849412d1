"""`kiln recipe show`, the generated field reference and schemas, `kiln --version`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import kiln
from kiln.platform.cli import main
from kiln.platform.recipe_docs import DOCS_DIR, generated_files, json_schema
from kiln.platform.recipes import CurateRecipe, TrainRecipe, load_recipe, show_recipe

REPO = Path(__file__).resolve().parents[2]
REGENERATE = "kiln recipe docs  (or: python -m kiln.platform.recipe_docs)"


def test_docs_are_in_step_with_the_models() -> None:
    """docs/recipes.md and docs/schema/*.json are what the models generate, byte for byte."""
    for rel, text in generated_files().items():
        path = DOCS_DIR / rel
        assert path.is_file(), f"{path} is missing: run `{REGENERATE}`"
        assert path.read_text() == text, f"{path} is out of date: run `{REGENERATE}`"


def test_every_field_is_documented() -> None:
    reference = generated_files()["recipes.md"]
    rows = [r for r in reference.splitlines() if r.startswith("| `")]
    assert len(rows) > 150
    undocumented = [r for r in rows if r.rstrip().endswith("|  |")]
    assert not undocumented, "fields without a description (add Field(description=...)):\n" + (
        "\n".join(undocumented)
    )
    assert "| `dataset` | str | required | folder holding manifest.json" in reference
    assert "relative to the recipe file's folder" in reference
    assert "#### stage `metaclip_balance`" in reference


def test_schemas_validate_the_shipped_recipes() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        jsonschema.validate(data, json_schema(data["kind"]))
    bad = yaml.safe_load((REPO / "recipes/quickstart/curate.yaml").read_text())
    bad["stages"][3]["tt"] = 5  # a typo in a stage's settings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json_schema("curate"))


def test_schema_marks_paths_and_flavor_defaults() -> None:
    train = json_schema("train")
    assert train["$schema"].endswith("2020-12/schema")
    dataset = train["$defs"]["DataConfig"]["properties"]["dataset"]
    assert "relative to the recipe file's folder" in dataset["description"]
    assert "kiln_path" not in json.dumps(train)
    image_size = train["$defs"]["ViTConfig"]["properties"]["image_size"]
    assert "default" not in image_size and "the flavor's" in image_size["description"]
    stages = json_schema("curate")["properties"]["stages"]
    assert "metaclip_balance" in json.dumps(stages)


def test_recipe_show_fills_every_default_and_loads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = REPO / "recipes/quickstart/curate.yaml"
    assert main(["recipe", "show", str(source), "--set", "stages.metaclip_balance.t=50"]) == 0
    shown = capsys.readouterr().out
    data = yaml.safe_load(shown)
    assert data["execution"]["rows_per_task"] == 50_000  # a default the file does not write
    balance = next(s for s in data["stages"] if s["stage"] == "metaclip_balance")
    assert balance["t"] == 50 and balance["entries"] == str(
        REPO / "runs/quickstart/pool/metadata.txt"
    )
    text = data["stages"][0]
    assert text["min_words"] == 1 and text["normalize"] is True  # the stage's own defaults
    # what it prints is a recipe that runs the same job
    (tmp_path / "shown.yaml").write_text(shown)
    again = load_recipe(tmp_path / "shown.yaml")
    original = load_recipe(source, ["stages.metaclip_balance.t=50"])
    assert isinstance(again, CurateRecipe) and isinstance(original, CurateRecipe)
    assert [s.spec() for s in again.plan()] == [s.spec() for s in original.plan()]
    assert again.input == original.input and again.run_dir == original.run_dir


def test_recipe_show_of_a_train_recipe_resolves_the_flavor() -> None:
    recipe = load_recipe(REPO / "recipes/quickstart/train.yaml", ["model.vision.image_size=48"])
    assert isinstance(recipe, TrainRecipe)
    data = yaml.safe_load(show_recipe(recipe))
    assert data["model"]["vision"] == {**data["model"]["vision"], "image_size": 48, "patch_size": 8}
    assert data["objective"] == {"name": "clip"} and data["optim"]["betas"] == [0.9, 0.98]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"kiln {kiln.__version__} (torch ")
    assert "ray " in out and "deepspeed " in out


def test_stages_registered_besides_kilns_do_not_change_the_docs() -> None:
    """A test's (or a plugin's) stage in the registry must not leak into the reference: the
    full suite registers tests/helpers_stages.py's before this module runs."""
    before = generated_files()
    import tests.helpers_stages  # noqa: F401  (registers its stages)

    assert generated_files() == before
