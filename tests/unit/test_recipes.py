"""Recipes: YAML + overrides, and errors that name the field, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kiln.platform.recipes import (
    CurateRecipe,
    EvalRecipe,
    RecipeError,
    TrainRecipe,
    apply_overrides,
    dump_recipe,
    load_recipe,
    parse_recipe,
    recipe_hash,
)

REPO = Path(__file__).resolve().parents[2]
CURATE = {
    "kind": "curate",
    "name": "c",
    "run_dir": "runs/c",
    "input": {"format": "parquet", "paths": ["pool.parquet"]},
    "match": {"entries": "entries.txt"},
}


@pytest.mark.parametrize("name", ["curate", "train", "eval"])
def test_quickstart_recipes_load(name: str) -> None:
    recipe = load_recipe(REPO / "recipes" / "quickstart" / f"{name}.yaml")
    assert recipe.kind == name


def test_example_recipes_load() -> None:
    files = sorted((REPO / "recipes" / "examples").glob("*.yaml"))
    assert files, "recipes/examples/ holds no recipe"
    for f in files:
        assert load_recipe(f).kind in ("curate", "train", "eval")


def test_override_sets_typed_value() -> None:
    recipe = load_recipe(REPO / "recipes/quickstart/curate.yaml", ["stages.metaclip_balance.t=50"])
    assert isinstance(recipe, CurateRecipe)
    balance = next(s for s in recipe.plan() if s.name == "metaclip_balance")
    assert balance.config.t == 50  # type: ignore[attr-defined]
    recipe = load_recipe(REPO / "recipes/quickstart/curate.yaml", ["stages.0.min_chars=9"])
    assert recipe.plan()[0].config.min_chars == 9  # type: ignore[union-attr]
    recipe = load_recipe(REPO / "recipes/quickstart/train.yaml", ["optim.betas=[0.8, 0.9]"])
    assert isinstance(recipe, TrainRecipe)
    assert recipe.optim.betas == (0.8, 0.9)


def test_override_does_not_mutate_input() -> None:
    data = {"a": {"b": 1}}
    out = apply_overrides(data, ["a.b=2", "a.c=x"])
    assert data == {"a": {"b": 1}}
    assert out == {"a": {"b": 2, "c": "x"}}


def test_unknown_field_suggests_closest_name() -> None:
    with pytest.raises(
        RecipeError, match=r"unknown field 'balance\.tt': did you mean 'balance\.t'"
    ):
        parse_recipe(apply_overrides(CURATE, ["balance.tt=5"]))
    with pytest.raises(RecipeError, match=r"unknown field 'balanse': did you mean 'balance'"):
        parse_recipe({**CURATE, "balanse": {"t": 5}})


def test_wrong_type_names_field_value_and_fix() -> None:
    with pytest.raises(RecipeError) as e:
        parse_recipe(apply_overrides(CURATE, ["balance.t=lots"]))
    msg = str(e.value)
    assert "'balance.t'" in msg and '"lots"' in msg and "--set balance.t=" in msg


def test_missing_field_and_bad_kind() -> None:
    data = {k: v for k, v in CURATE.items() if k != "match"}
    with pytest.raises(RecipeError, match=r"no stages: list and no match\.entries"):
        parse_recipe(data)
    with pytest.raises(RecipeError, match="did you mean 'train'"):
        parse_recipe({**CURATE, "kind": "trian"})


def test_eval_field_named_like_a_kind_is_reported_with_its_path() -> None:
    with pytest.raises(RecipeError, match=r"'eval\.recal_k': did you mean 'eval\.recall_k'"):
        parse_recipe(
            {
                "kind": "eval",
                "name": "e",
                "run_dir": "r",
                "checkpoint": "c",
                "eval": {"recal_k": [1]},
            }
        )


def test_bad_override_syntax() -> None:
    with pytest.raises(RecipeError, match=r"key\.path=value"):
        apply_overrides(CURATE, ["balance.t"])
    with pytest.raises(RecipeError, match="is a value"):
        apply_overrides(CURATE, ["name.x=1"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [curate\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_dump_roundtrip_and_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.platform.recipes import resolve_paths

    monkeypatch.chdir(tmp_path)
    recipe = resolve_paths(parse_recipe(CURATE))  # a run dir records its recipe resolved
    dump_recipe(recipe, tmp_path / "sub" / "recipe.yaml")
    again = load_recipe(tmp_path / "sub" / "recipe.yaml")
    assert again == recipe
    assert recipe_hash(again) == recipe_hash(recipe)
    changed = parse_recipe(apply_overrides(CURATE, ["balance.t=7"]))
    assert recipe_hash(changed) != recipe_hash(recipe)


def test_eval_recipe_defaults() -> None:
    r = parse_recipe({"kind": "eval", "name": "e", "run_dir": "r", "checkpoint": "c"})
    assert isinstance(r, EvalRecipe) and r.eval.recall_k == [1, 5, 10]


def test_resolve_paths_makes_local_paths_absolute_and_keeps_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln.platform.recipes import resolve_paths

    monkeypatch.chdir(tmp_path)
    recipe = parse_recipe(
        apply_overrides(CURATE, ["input.paths=[a.parquet, s3://bucket/b.parquet]"])
    )
    resolved = resolve_paths(recipe)
    assert isinstance(resolved, CurateRecipe)
    assert resolved.input.paths == [str(tmp_path / "a.parquet"), "s3://bucket/b.parquet"]
    assert resolved.run_dir == str(tmp_path / "runs/c")
    assert resolved.match.entries == str(tmp_path / "entries.txt")
    assert resolved.shard.output is None


def test_relative_paths_resolve_against_the_recipe_folder_and_set_against_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe in its own folder with relative paths runs the same from any directory;
    `--set` values are the user's, typed in the cwd."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "images").mkdir()
    recipe_file = folder / "curate.yaml"
    data = {
        **CURATE,
        "input": {
            "format": "csv",
            "paths": ["data/pool.csv"],
            "image_dir": "images",
            "image_path_column": "file",
        },
        "stages": [
            {"stage": "text"},
            {"stage": "metaclip_match", "entries": "../shared/entries.txt"},
            {"stage": "metaclip_balance", "t": 10},
        ],
    }
    del data["match"]
    recipe_file.write_text(yaml.safe_dump(data))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(recipe_file)
    assert isinstance(recipe, CurateRecipe)
    assert recipe.run_dir == str(folder / "runs/c")
    assert recipe.input.paths == [str(folder / "data/pool.csv")]
    assert recipe.input.image_dir == str(folder / "images")  # checked to exist: it does
    assert recipe.stages[1]["entries"] == str(tmp_path / "shared/entries.txt")  # type: ignore[index]

    recipe = load_recipe(recipe_file, ["input.paths=[mine.csv]", "stages.1.entries=e.txt"])
    assert recipe.input.paths == [str(elsewhere / "mine.csv")]
    assert recipe.stages[1]["entries"] == str(elsewhere / "e.txt")  # type: ignore[index]
    assert recipe.run_dir == str(folder / "runs/c")

    # a missing image_dir (checked when the recipe loads) says which folder it was read from
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe_file, ["input.image_dir=pics"])
    assert str(elsewhere / "pics") in str(e.value)
    assert (
        f"--set input.image_dir: 'pics' is resolved against the current directory {elsewhere}"
        in str(e.value)
    )
    (folder / "images").rmdir()
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe_file)
    assert (
        f"input.image_dir: 'images' in {recipe_file} is resolved against the recipe's folder "
        f"{folder}" in str(e.value)
    )


PLAN = {
    **{k: v for k, v in CURATE.items() if k != "match"},
    "stages": [
        {"stage": "text", "min_chars": 3},
        {"stage": "metaclip_match", "entries": "entries.txt"},
        {"stage": "metaclip_balance", "t": 10},
    ],
}


def test_plan_recipe_validates_each_stage() -> None:
    recipe = parse_recipe(PLAN)
    assert isinstance(recipe, CurateRecipe)
    plan = recipe.plan()
    assert [s.name for s in plan] == ["text", "metaclip_match", "metaclip_balance"]
    assert plan[2].config.entries == "entries.txt"  # type: ignore[attr-defined]
    with pytest.raises(
        RecipeError, match=r"stages\[2\] \(metaclip_balance\): unknown field 'tt': did you mean 't'"
    ):
        parse_recipe(apply_overrides(PLAN, ["stages.metaclip_balance.tt=5"]))
    with pytest.raises(
        RecipeError, match=r"unknown stage 'metaclip_balanse': did you mean 'metaclip_balance'"
    ):
        parse_recipe({**PLAN, "stages": [*PLAN["stages"], {"stage": "metaclip_balanse"}]})
    with pytest.raises(RecipeError, match="needs the column"):
        parse_recipe({**PLAN, "stages": [{"stage": "image_dedup"}]})
    with pytest.raises(RecipeError, match="already used"):
        parse_recipe({**PLAN, "stages": [{"stage": "text"}, {"stage": "text"}]})
    renamed = parse_recipe(
        {**PLAN, "stages": [{"stage": "text"}, {"stage": "text", "name": "text2"}]}
    )
    assert [s.name for s in renamed.plan()] == ["text", "text2"]  # type: ignore[union-attr]


def test_plan_and_old_sections_together_show_the_new_form() -> None:
    with pytest.raises(RecipeError, match=r"both stages: and the section\(s\) balance.*stages: \["):
        parse_recipe({**PLAN, "balance": {"t": 5}})


def test_old_form_runs_the_default_metaclip_plan() -> None:
    recipe = parse_recipe({**CURATE, "text": {"dedup": False}, "balance": {"t": 7}})
    plan = recipe.plan()  # type: ignore[union-attr]
    assert [s.name for s in plan] == [
        "text", "metaclip_match", "metaclip_balance", "image", "image_dedup"
    ]  # fmt: skip
    assert plan[2].config.t == 7 and plan[2].config.entries == "entries.txt"  # type: ignore[attr-defined]


def test_stage_paths_resolve_against_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln.platform.recipes import resolve_paths

    monkeypatch.chdir(tmp_path)
    recipe = resolve_paths(parse_recipe(PLAN))
    assert recipe.stages[1]["entries"] == str(tmp_path / "entries.txt")  # type: ignore[union-attr]
    with pytest.raises(RecipeError, match="no item 'nope'"):
        apply_overrides(PLAN, ["stages.nope.t=1"])


@pytest.mark.parametrize("arch", ["siglip", "coca", "mae"])
def test_example_objective_recipes_load(arch: str) -> None:
    recipe = load_recipe(REPO / "recipes" / "examples" / f"{arch}_tiny.yaml")
    assert isinstance(recipe, TrainRecipe)
    assert recipe.model.arch == arch and recipe.objective is not None
    assert recipe.objective.name == arch
    assert recipe.data.dataset == str(REPO / "runs/quickstart/curate/dataset")


def test_unknown_flavor_in_a_recipe_lists_the_valid_ones() -> None:
    path = REPO / "recipes" / "quickstart" / "train.yaml"
    with pytest.raises(RecipeError) as e:
        load_recipe(path, ["model.flavor=clip-vit-b-61"])
    msg = str(e.value)
    assert "unknown model flavor 'clip-vit-b-61'" in msg and "clip-vit-b-16" in msg
    assert "mae-vit-h-14" in msg
    nested = load_recipe(path, ["model.flavor=clip-vit-b-16", "model.vision.image_size=160"])
    assert nested.model.vision.image_size == 160 and nested.model.vision.width == 768
    legacy = load_recipe(path, ["model.image_size=16", "model.vision_width=32"])
    assert (legacy.model.vision.image_size, legacy.model.vision.width) == (16, 32)


def test_resources_restarts_and_placement() -> None:
    train_yaml = REPO / "recipes/quickstart/train.yaml"
    recipe = load_recipe(train_yaml)
    assert isinstance(recipe, TrainRecipe)
    assert (recipe.resources.max_restarts, recipe.resources.placement) == (0, "pack")
    recipe = load_recipe(
        train_yaml,
        [
            "resources.launcher=ray",
            "resources.max_restarts=2",
            "resources.placement=strict_spread",
        ],
    )
    assert isinstance(recipe, TrainRecipe)
    assert (recipe.resources.max_restarts, recipe.resources.placement) == (2, "strict_spread")
    with pytest.raises(RecipeError, match=r"resources\.launcher=ray or drop resources\.placement"):
        load_recipe(train_yaml, ["resources.launcher=local", "resources.placement=spread"])
    with pytest.raises(RecipeError, match="max_restarts=1 needs launcher ray or local"):
        load_recipe(train_yaml, ["resources.launcher=torchrun", "resources.max_restarts=1"])
    with pytest.raises(RecipeError, match=r"'resources\.max_restarts' = -1 is invalid"):
        load_recipe(train_yaml, ["resources.max_restarts=-1"])
    with pytest.raises(RecipeError, match=r"'resources\.placement' = \"everywhere\" is invalid"):
        load_recipe(train_yaml, ["resources.placement=everywhere"])


def test_a_field_set_one_section_too_high_suggests_the_nested_one() -> None:
    """`--set model.imagesize=60`: the fix is model.vision.image_size, never `--set model=`."""
    train_yaml = REPO / "recipes/quickstart/train.yaml"
    with pytest.raises(RecipeError) as e:
        load_recipe(train_yaml, ["model.imagesize=64"])
    assert "unknown field 'model.imagesize': did you mean 'model.vision.image_size'?" in str(
        e.value
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(train_yaml, ["model.width=64"])
    assert "did you mean 'model.vision.width' or 'model.text.width'" in str(e.value)
    # the old flat name still works, and a size that does not fit says which field, once
    assert load_recipe(train_yaml, ["model.image_size=64"]).model.vision.image_size == 64  # type: ignore[union-attr]
    with pytest.raises(RecipeError) as e:
        load_recipe(train_yaml, ["model.image_size=60"])
    message = str(e.value)
    assert "model.vision.image_size=60 is not a multiple of model.vision.patch_size=8" in message
    assert "--set model=" not in message and message.count("model.vision") == 2
