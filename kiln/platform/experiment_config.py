"""The `kind: experiment` recipe: several curation arms of one pool, trained at equal compute.

An experiment names a synthetic pool (usually with `plant:` corruption, whose ground truth
scores the pruning), optionally a filter model that kiln curates and trains first (DFN's
recipe: a CLIP trained on a clean set, used only to embed and score the pool), one train
recipe shared by every arm (same steps, same batch: equal compute), and the arms, each a
curation plan. Strings in an arm's or the filter's stages may name `${run_dir}` (the
experiment's folder), `${pool}` (the pool's folder) and `${filter}` (the filter model's
train run dir); other relative paths are relative to the experiment file's folder.

Errors name the field and the fix, as recipe errors do (`RecipeError`).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from kiln.contracts import PATH_BASE, RecipePath, StrictModel
from kiln.data_curation.config import SyntheticPoolConfig
from kiln.data_curation.plan import resolve_spec_paths
from kiln.platform.recipes import RayConfig, RecipeError, apply_overrides

__all__ = [
    "ArmConfig",
    "ExperimentRecipe",
    "FilterModelConfig",
    "TrainRef",
    "load_experiment",
    "parse_experiment",
    "substitute",
    "variables",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VARIABLES = ("run_dir", "pool", "filter")


class TrainRef(StrictModel):
    """The train recipe every arm (and the filter model) trains with."""

    recipe: RecipePath = Field(
        description="a `kind: train` recipe file; each arm's run_dir, dataset and eval sets "
        "are set by the experiment",
    )
    set: list[str] = Field(
        default_factory=list,
        description="overrides of that recipe for every arm (`max_steps=150`, "
        "`data.batch_size=32`): the same for all arms, so compute is equal",
    )


class FilterModelConfig(StrictModel):
    """A filter model kiln trains before the arms: curate a clean pool, train on it."""

    pool: SyntheticPoolConfig = Field(
        description="the clean (high-quality) synthetic pool the filter is trained on; use "
        "another seed than the experiment's pool"
    )
    stages: list[dict[str, Any]] = Field(
        description="its curation plan (a curate recipe's `stages:`)"
    )
    set: list[str] = Field(
        default_factory=list,
        description="overrides of the train recipe for the filter only (e.g. max_steps=300)",
    )


class ArmConfig(StrictModel):
    """One arm: a curation plan of the experiment's pool, then the shared training."""

    name: str = Field(description="the arm's name (a folder name: letters, digits, _ . -)")
    stages: list[dict[str, Any]] = Field(
        description="the arm's curation plan (a curate recipe's `stages:`; `${filter}` "
        "names the filter model)"
    )
    set: list[str] = Field(
        default_factory=list,
        description="overrides of the arm's curate recipe (e.g. shard.samples_per_shard=128)",
    )

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                f"arm name {v!r} is not a folder name: use letters, digits, _ . - "
                "(e.g. baseline, pruned)"
            )
        return v


class ExperimentRecipe(StrictModel):
    """`kind: experiment`: curate the pool several ways, train each at equal compute,
    evaluate on the pool's held-out set, compare."""

    kind: Literal["experiment"] = Field(description="the kind of job")
    name: str = Field(min_length=1, description="the experiment's name")
    run_dir: RecipePath = Field(
        min_length=1,
        description="folder for the pool, the filter model, each arm and the comparison",
    )
    pool: SyntheticPoolConfig = Field(
        description="the synthetic pool every arm curates (`plant:` gives the ground truth "
        "the pruning is scored against); generated into RUN_DIR/pool"
    )
    filter: FilterModelConfig | None = Field(
        default=None, description="a filter model to train first (named `${filter}` in stages)"
    )
    train: TrainRef = Field(description="the train recipe shared by every arm")
    arms: list[ArmConfig] = Field(description="the curation arms, compared in this order")
    duplicate_reasons: list[str] = Field(
        default_factory=lambda: ["semantic_duplicate"],
        description="drop reasons scored against the planted near-duplicates",
    )
    mismatch_reasons: list[str] = Field(
        default_factory=lambda: ["low_clip_score"],
        description="drop reasons scored against the planted mismatched captions",
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="which Ray the runs use")

    @model_validator(mode="after")
    def _check(self) -> ExperimentRecipe:
        if len(self.arms) < 2:
            raise ValueError(
                f"arms lists {len(self.arms)} arm: an experiment compares at least two "
                "(e.g. baseline and pruned)"
            )
        names = [a.name for a in self.arms]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"arm names {twice} are used twice: give each arm its own name")
        uses_filter = any("${filter}" in str(a.stages) for a in self.arms)
        if uses_filter and self.filter is None:
            raise ValueError(
                "an arm's stages name ${filter} but the experiment has no `filter:` section: "
                "add one (a clean pool, its stages, train overrides) or name a checkpoint"
            )
        for ref in self.train.set:
            key = ref.partition("=")[0].strip()
            if key in ("run_dir", "data.dataset"):
                raise ValueError(
                    f"train.set sets {key!r}, which the experiment sets for each arm: "
                    "remove that override"
                )
        return self


def substitute(node: Any, values: dict[str, str]) -> Any:
    """`node` with `${name}` replaced by `values[name]` in every string; an unknown
    `${name}` is an error naming the ones there are."""
    if isinstance(node, dict):
        return {k: substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, values) for v in node]
    if isinstance(node, str) and "${" in node:

        def one(m: re.Match[str]) -> str:
            if m.group(1) not in values:
                raise RecipeError(
                    f"{node!r} names ${{{m.group(1)}}}: an experiment knows "
                    f"{', '.join('${' + v + '}' for v in _VARIABLES)}"
                )
            return values[m.group(1)]

        return re.sub(r"\$\{([^}]*)\}", one, node)
    return node


def _describe(error: Any, source: str) -> str:
    loc = tuple(error["loc"])
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        model: Any = ExperimentRecipe
        for part in loc[:-1]:
            field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
            ann = getattr(field, "annotation", None)
            args = [a for a in getattr(ann, "__args__", ()) if hasattr(a, "model_fields")]
            model = ann if hasattr(ann, "model_fields") else (args[0] if args else None)
        valid = list(getattr(model, "model_fields", {}))
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"valid fields here: {', '.join(valid)}"
        return f"{source}: unknown field {dotted!r}: {hint}"
    if error["type"] == "missing":
        return f"{source}: field {dotted!r} is required: add it to the experiment recipe"
    msg = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "value_error":
        return f"{source}: {msg}" if not loc else f"{source}: {dotted}: {msg}"
    return f"{source}: field {dotted!r} is invalid: {msg}; fix it in the recipe or --set it"


def parse_experiment(
    data: Any, *, source: str = "experiment", base: str | None = None
) -> ExperimentRecipe:
    """Validate an experiment dict; errors name the field and the fix. With `base` (a
    folder), `run_dir` and `train.recipe` come back absolute against it (`--set` values
    against the cwd), as `parse_recipe` does."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: an experiment is a YAML mapping, got {type(data).__name__}")
    if data.get("kind") != "experiment":
        raise RecipeError(
            f"{source}: field 'kind' = {data.get('kind')!r}: `kiln experiment` runs "
            "`kind: experiment` recipes (run curate / train / eval recipes with their verbs)"
        )
    try:
        return ExperimentRecipe.model_validate(
            data, context=None if base is None else {PATH_BASE: base}
        )
    except ValidationError as e:
        raise RecipeError("\n".join(_describe(err, source) for err in e.errors())) from None


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentRecipe:
    """Read an experiment file (plus `a.b=c` overrides); `run_dir`, `train.recipe` and the
    stages' paths come back absolute: the file's against its folder, the overrides' (as
    with every recipe) against the current directory."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"experiment file {str(p)!r} does not exist: check the path")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from None
    folder = os.path.dirname(os.path.abspath(p))
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides)
    recipe = parse_experiment(data, source=str(p), base=folder)
    values = variables(recipe.run_dir)

    def plan(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(resolve_spec_paths(substitute(stages, values), {PATH_BASE: folder}))

    arms = [a.model_copy(update={"stages": plan(a.stages)}) for a in recipe.arms]
    filt = recipe.filter
    if filt is not None:
        filt = filt.model_copy(update={"stages": plan(filt.stages)})
    return recipe.model_copy(update={"arms": arms, "filter": filt})


def variables(run_dir: str) -> dict[str, str]:
    """What `${run_dir}`, `${pool}` and `${filter}` stand for in an experiment in `run_dir`."""
    root = run_dir.rstrip("/")
    return {"run_dir": root, "pool": f"{root}/pool", "filter": f"{root}/filter/train"}
