"""`RecipePath`: a config field typed as a path resolves itself while it is validated, against
the folder in the validation context (a recipe file's folder), a `--set` value against the
cwd; URLs and absolute paths stay as they are. A new config (or stage) that declares one
needs nothing else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, Field, ValidationError

from kiln.contracts import (
    PATH_BASE,
    CwdRelative,
    RecipePath,
    StrictModel,
    is_path_field,
)
from kiln.platform.recipes import (
    CurateRecipe,
    load_recipe,
    missing_path_hint,
    parse_recipe,
    recipe_hash,
    resolve_paths,
)


class _Paths(StrictModel):
    one: RecipePath = Field(min_length=1)
    many: list[RecipePath] = Field(default_factory=list)
    by_language: dict[str, RecipePath] = Field(default_factory=dict)
    maybe: RecipePath | None = None
    text: str = "as is"


def test_relative_values_resolve_against_the_context_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    data = {
        "one": "data/a.txt",
        "many": ["b.txt", CwdRelative("typed.txt"), "/abs/c.txt", "s3://bucket/d", "~/e.txt"],
        "by_language": {"en": "en.txt", "de": CwdRelative("../de.txt"), "fr": "gs://b/fr.txt"},
        "maybe": "file:///kept/as/is",
        "text": CwdRelative("not a path"),
    }
    got = _Paths.model_validate(data, context={PATH_BASE: "/recipes"})
    assert got.one == "/recipes/data/a.txt"
    assert got.many == [
        "/recipes/b.txt",
        str(cwd / "typed.txt"),  # a --set value: where the user typed it
        "/abs/c.txt",
        "s3://bucket/d",
        os.path.expanduser("~/e.txt"),
    ]
    assert got.by_language == {"en": "/recipes/en.txt", "de": str(tmp_path / "de.txt"),
                               "fr": "gs://b/fr.txt"}  # fmt: skip
    assert got.maybe == "file:///kept/as/is"
    assert got.text == "not a path" and type(got.text) is str  # only paths resolve

    # a recipe on object storage: its relative paths are URLs beside it
    remote = _Paths.model_validate(
        {"one": "../data/a.txt", "many": ["/abs/b"]}, context={PATH_BASE: "s3://bkt/recipes"}
    )
    assert (remote.one, remote.many) == ("s3://bkt/data/a.txt", ["/abs/b"])


def test_without_a_base_values_stay_as_given() -> None:
    """A config built in code keeps its values (`resolve_paths` resolves them before a job
    starts); a `--set` marker does not leak out of validation."""
    got = _Paths.model_validate({"one": "a.txt", "many": [CwdRelative("b.txt")]})
    assert got.one == "a.txt" and got.many == ["b.txt"] and type(got.many[0]) is str
    with pytest.raises(ValidationError, match="valid string"):
        _Paths.model_validate({"one": 5}, context={PATH_BASE: "/recipes"})
    with pytest.raises(ValidationError, match="at least 1 character"):
        _Paths.model_validate({"one": ""}, context={PATH_BASE: "/recipes"})


def test_the_type_is_what_marks_a_path_field() -> None:
    fields = _Paths.model_fields
    assert [n for n, f in fields.items() if is_path_field(f)] == [
        "one", "many", "by_language", "maybe"
    ]  # fmt: skip
    schema = str(_Paths.model_json_schema())
    assert schema.count("kiln_path") == 4  # the recipe reference turns each into a note


def _write(path: Path, data: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


_STAGES = [
    {"stage": "text", "min_chars": 3},
    {"stage": "language"},
    {"stage": "worldwide_match", "entries": {"en": "meta/en.txt", "de": "/abs/de.txt"}},
    {
        "stage": "embed",
        "precomputed": {
            "paths": ["emb/*.parquet", "s3://b/e"],
            "image_column": "i",
            "text_column": "t",
        },
    },
    {"stage": "clip_score", "top_fraction": 0.5, "uids_out": "kept.npy"},
]


def _curate(stages: list[dict[str, object]], **extra: object) -> dict[str, object]:
    return {
        "kind": "curate",
        "name": "c",
        "run_dir": "runs/c",
        "input": {"format": "parquet", "paths": ["pool/a.parquet", "s3://bucket/b.parquet"]},
        "stages": stages,
        **extra,
    }


def test_stage_paths_resolve_in_place_against_the_file_or_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stages:` items stay as written (the recipe's hash is over them) except their paths:
    in a map (language -> entries), in a list inside a section, and a plain one."""
    folder = tmp_path / "project"
    recipe_file = _write(folder / "curate.yaml", _curate(_STAGES))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    recipe = load_recipe(recipe_file)
    assert isinstance(recipe, CurateRecipe) and recipe.stages is not None
    assert recipe.input.paths == [str(folder / "pool/a.parquet"), "s3://bucket/b.parquet"]
    assert [sorted(s) for s in recipe.stages] == [sorted(s) for s in _STAGES]  # no defaults
    assert recipe.stages[0] == {"stage": "text", "min_chars": 3}
    assert recipe.stages[2]["entries"] == {"en": str(folder / "meta/en.txt"), "de": "/abs/de.txt"}
    assert recipe.stages[3]["precomputed"] == {
        "paths": [str(folder / "emb/*.parquet"), "s3://b/e"],
        "image_column": "i",
        "text_column": "t",
    }
    assert recipe.stages[4]["uids_out"] == str(folder / "kept.npy")
    assert recipe_hash(resolve_paths(recipe)) == recipe_hash(recipe)  # resolved once for all

    typed = load_recipe(
        recipe_file,
        ["stages.worldwide_match.entries.de=de.txt", "stages.clip_score.uids_out=mine.npy"],
    )
    assert typed.stages is not None  # type: ignore[union-attr]
    entries = typed.stages[2]["entries"]  # type: ignore[union-attr]
    assert entries == {"en": str(folder / "meta/en.txt"), "de": str(elsewhere / "de.txt")}
    assert typed.stages[4]["uids_out"] == str(elsewhere / "mine.npy")  # type: ignore[union-attr]
    assert all(type(v) is str for v in entries.values())

    # the same recipe built in code resolves against the cwd, when the job starts
    built = parse_recipe(_curate(_STAGES))
    assert built.stages[4]["uids_out"] == "kept.npy"  # type: ignore[union-attr]
    assert resolve_paths(built).stages[4]["uids_out"] == str(elsewhere / "kept.npy")  # type: ignore[union-attr]


_PLUGIN = """
from pydantic import Field
from kiln.contracts import RecipePath, StrictModel
from kiln.data_curation.stage import MapStage, register


class ProbeSection(StrictModel):
    table: RecipePath = Field(description="a table")


class ProbeConfig(StrictModel):
    lookup: RecipePath = Field(description="a file the stage reads")
    extra: list[RecipePath] = Field(default_factory=list, description="more files")
    section: ProbeSection | None = Field(default=None, description="a nested section")
    label: str = Field(default="x", description="not a path")


class ProbeStage(MapStage[ProbeConfig]):
    name = "path_probe"
    config = ProbeConfig

    def apply(self, table, cfg, ctx):
        return table


register(ProbeStage())
"""


def test_a_new_stage_with_path_fields_resolves_with_no_other_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin stage declares `RecipePath` fields and its paths resolve like kiln's own:
    nothing lists path fields (the plugin is loaded before its stage's paths resolve)."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "kiln_path_probe_plugin.py").write_text(_PLUGIN)
    monkeypatch.syspath_prepend(str(plugins))
    folder = tmp_path / "project"
    step = {
        "stage": "path_probe",
        "lookup": "lookup.txt",
        "extra": ["x/y.bin", "/abs/z.bin"],
        "section": {"table": "../tables/t.parquet"},
        "label": "lookup.txt",
    }
    recipe_file = _write(
        folder / "curate.yaml", _curate([step], plugins=["kiln_path_probe_plugin"])
    )
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(recipe_file)
    assert recipe.stages == [  # type: ignore[union-attr]
        {
            "stage": "path_probe",
            "lookup": str(folder / "lookup.txt"),
            "extra": [str(folder / "x/y.bin"), "/abs/z.bin"],
            "section": {"table": str(tmp_path / "tables/t.parquet")},
            "label": "lookup.txt",  # a str field, not a path: as written
        }
    ]
    config = recipe.plan()[0].config  # type: ignore[union-attr]
    assert config.lookup == str(folder / "lookup.txt")  # type: ignore[attr-defined]
    fields = type(config).model_fields
    assert [n for n, f in fields.items() if is_path_field(f)] == ["lookup", "extra"]
    section = fields["section"].annotation.__args__[0]  # type: ignore[union-attr]
    assert is_path_field(section.model_fields["table"])


def test_a_missing_path_names_where_it_was_written(tmp_path: Path) -> None:
    folder = tmp_path / "project"
    recipe_file = _write(folder / "curate.yaml", _curate(_STAGES))
    message = f"{folder / 'meta/en.txt'} does not exist; nor does {folder / 'pool/a.parquet'}"
    hint = missing_path_hint(message, recipe_file)
    assert (
        f"stages.2.entries.en: 'meta/en.txt' in {recipe_file} is resolved against the "
        f"recipe's folder {folder}" in hint
    )
    assert f"input.paths: 'pool/a.parquet' in {recipe_file}" in hint
    assert "kept.npy" not in hint  # a path the message does not name
    assert missing_path_hint("nothing to do with paths", recipe_file) == (
        "nothing to do with paths"
    )


def test_experiment_paths_resolve_the_same_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An experiment's own paths and its arms' stage paths: the file's against its folder,
    `--set` values against the cwd."""
    from kiln.platform.experiment_config import load_experiment

    doc = {
        "kind": "experiment",
        "name": "t",
        "run_dir": "out",
        "pool": {"num_samples": 100, "plant": {"near_duplicates": 0.1, "mismatched": 0.1}},
        "train": {"recipe": "train.yaml"},
        "arms": [
            {"name": "baseline", "stages": [{"stage": "text"}]},
            {"name": "pruned", "stages": [{"stage": "clip_score", "uids_out": "k.npy"}]},
        ],
    }
    path = _write(tmp_path / "sub" / "exp.yaml", doc)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    exp = load_experiment(path)
    assert (exp.run_dir, exp.train.recipe) == (
        str(tmp_path / "sub" / "out"), str(tmp_path / "sub" / "train.yaml")
    )  # fmt: skip
    assert exp.arms[1].stages[0]["uids_out"] == str(tmp_path / "sub" / "k.npy")
    typed = load_experiment(
        path, ["train.recipe=t.yaml", "arms.pruned.stages.clip_score.uids_out=mine.npy"]
    )
    assert typed.train.recipe == str(here / "t.yaml")
    assert typed.arms[1].stages[0]["uids_out"] == str(here / "mine.npy")
    assert typed.run_dir == str(tmp_path / "sub" / "out")


class _NewConfig(BaseModel):
    """Any pydantic model gets the behaviour from the type alone."""

    where: RecipePath


def test_any_model_with_the_type_resolves(tmp_path: Path) -> None:
    assert _NewConfig.model_validate({"where": "w"}, context={PATH_BASE: str(tmp_path)}).where == (
        str(tmp_path / "w")
    )
    assert _NewConfig(where="w").where == "w"
