"""Recipes: YAML job files validated by pydantic, with `--set a.b=c` overrides.

A recipe is one job: `kind` (curate | train | eval), `name`, `run_dir`, `resources`, `ray`
and the kind's own config sections. The same file runs locally or, later, on a cluster.
Every mistake in a recipe is reported as a `RecipeError` that names the field, the value
and the fix (for an unknown field: the closest valid name), never as a traceback.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, model_validator

from kiln.contracts import StrictModel, is_path_field, json_sha256
from kiln.data_curation.config import CurationConfig
from kiln.resource_fit import RAY_START_TIMEOUT_S
from kiln.training.config import EvalConfig, Launcher, Placement, TrainConfig

R = TypeVar("R", bound=BaseModel)

__all__ = [
    "CurateRecipe",
    "EvalRecipe",
    "RayConfig",
    "Recipe",
    "RecipeError",
    "Resources",
    "TrainRecipe",
    "apply_overrides",
    "dump_recipe",
    "load_recipe",
    "parse_recipe",
    "recipe_hash",
    "resolve_paths",
]


class RecipeError(ValueError):
    """A recipe could not be loaded; the message says what is wrong and how to fix it."""


class Resources(StrictModel):
    """Workers a job runs on and how training ranks are started.

    `launcher: ray` runs the ranks as Ray Train workers (on one machine or a Ray cluster),
    `local` as plain processes on this machine, `torchrun` as the one rank of this process
    (started by torchrun or srun, which decide the world size). `max_restarts` is how many
    times a failed rank makes the launcher restart every rank from the latest complete
    checkpoint (0: a failure ends the run, as with Ray Train by default).
    """

    workers: int = Field(default=2, ge=1, description="training ranks / Ray Train workers")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    launcher: Launcher = "ray"
    max_restarts: int = Field(
        default=0,
        ge=0,
        description="restarts from the latest complete checkpoint after a rank fails "
        "(launchers ray and local)",
    )
    placement: Placement = Field(
        default="pack",
        description="Ray Train worker placement: pack (fewest nodes), spread, strict_pack "
        "(one node), strict_spread (each worker on its own node)",
    )
    start_timeout_s: float = Field(
        default=RAY_START_TIMEOUT_S,
        gt=0,
        description="seconds Ray Train may take to start the workers (launcher ray) before "
        "the run fails saying what it waited for; settings that can never fit are refused "
        "at once",
    )

    @model_validator(mode="after")
    def _placement_needs_ray(self) -> Resources:
        if self.placement != "pack" and self.launcher != "ray":
            raise ValueError(
                f"placement={self.placement!r} places Ray Train workers, but launcher="
                f"{self.launcher!r}: set resources.launcher=ray or drop resources.placement"
            )
        if self.max_restarts and self.launcher == "torchrun":
            raise ValueError(
                f"max_restarts={self.max_restarts} needs launcher ray or local: under "
                "launcher=torchrun the starter restarts ranks (a requeued Slurm job resumes "
                "from the latest complete checkpoint); leave resources.max_restarts at 0"
            )
        return self


class RayConfig(StrictModel):
    """Which Ray to use. No address: start Ray in-process, bound to 127.0.0.1 only."""

    address: str | None = Field(
        default=None, description="an existing cluster (e.g. ray://HEAD:10001 or auto)"
    )
    num_cpus: int | None = Field(
        default=None, ge=1, description="CPUs of the embedded Ray (default: all)"
    )


class _JobFields(StrictModel):
    name: str = Field(min_length=1)
    run_dir: str = Field(min_length=1, description="where outputs go (relative: to the cwd)")
    resources: Resources = Field(default_factory=Resources)
    ray: RayConfig = Field(default_factory=RayConfig)


class CurateRecipe(_JobFields, CurationConfig):
    """`kind: curate`: raw pool -> curated WebDataset shards."""

    kind: Literal["curate"]

    @model_validator(mode="after")
    def _executor_matches_ray(self) -> CurateRecipe:
        if self.execution.executor == "local" and self.ray.address:
            raise ValueError(
                f"execution.executor=local runs on this machine, but ray.address="
                f"{self.ray.address!r} names a cluster: drop one of the two"
            )
        return self


class TrainRecipe(_JobFields, TrainConfig):
    """`kind: train`: shards -> a trained, checkpointed model."""

    kind: Literal["train"]


class EvalRecipe(_JobFields):
    """`kind: eval`: evaluate a checkpoint (a train run dir, a model.pt or an export)."""

    kind: Literal["eval"]
    checkpoint: str = Field(
        description="a train run dir (its latest checkpoint), a checkpoint folder, a model.pt "
        "or a .safetensors file from `kiln export`"
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)


Recipe = Annotated[CurateRecipe | TrainRecipe | EvalRecipe, Field(discriminator="kind")]
_RECIPE_ADAPTER: TypeAdapter[CurateRecipe | TrainRecipe | EvalRecipe] = TypeAdapter(Recipe)
_KINDS: dict[str, type[BaseModel]] = {
    "curate": CurateRecipe,
    "train": TrainRecipe,
    "eval": EvalRecipe,
}


def _parse_value(raw: str) -> Any:
    """A `--set` value as YAML would read it: `50` is an int, `[1,2]` a list, `x` a string."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides to a nested dict (a copy); unknown keys are caught by validation."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(
                f"override {item!r} is not of the form key.path=value: "
                "write e.g. --set balance.t=50"
            )
        parts = key.strip().split(".")
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            child = _list_item(node, part, item) if isinstance(node, list) else node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict | list):
                where = ".".join(parts[: i + 1])
                raise RecipeError(
                    f"override {item!r}: {where!r} is a value ({child!r}), not a section, "
                    f"so it has no field {parts[i + 1]!r}"
                )
            node = child
        if isinstance(node, list):
            raise RecipeError(
                f"override {item!r}: {'.'.join(parts[:-1])!r} is a list: name one of its "
                "items, e.g. --set stages.metaclip_balance.t=50"
            )
        node[parts[-1]] = _parse_value(raw)
    return out


def _list_item(items: list[Any], part: str, override: str) -> Any:
    """The item of a list named by `part`: an index, or a stage's step name (`name`, else
    `stage`), so `--set stages.metaclip_balance.t=50` reaches into a plan."""
    if part.isdigit() and int(part) < len(items):
        return items[int(part)]
    named = [x for x in items if isinstance(x, dict) and (x.get("name") or x.get("stage")) == part]
    if len(named) == 1:
        return named[0]
    names = [str(x.get("name") or x.get("stage")) for x in items if isinstance(x, dict)]
    raise RecipeError(
        f"override {override!r}: no item {part!r} in that list: use an index or one of "
        f"{', '.join(names) or '(none)'}"
    )


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid field names of the section at `loc` (a pydantic error location) in `model`."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = field.annotation
        # Optional[Section] / list[...] annotations: find a BaseModel inside.
        args = getattr(current, "__args__", ())
        for arg in args:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _describe(error: Any, kind: str, source: str) -> str:
    model = _KINDS[kind]
    loc = tuple(error["loc"])
    if loc and loc[0] == kind:  # the discriminated union's tag
        loc = loc[1:]
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    value = error.get("input")
    etype = error["type"]
    if etype == "extra_forbidden":
        valid = _field_names(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        parent = ".".join(str(p) for p in loc[:-1])
        hint = (
            f"did you mean {'.'.join([parent, close[0]]) if parent else close[0]!r}?"
            if close
            else f"valid fields here: {', '.join(valid)}"
        )
        return f"{source}: unknown field {dotted!r}: {hint}"
    if etype == "value_error":
        where = f"{dotted}: " if loc else ""
        return f"{source}: {where}{str(error['msg']).removeprefix('Value error, ')}"
    if etype == "missing":
        return f"{source}: field {dotted!r} is required: add it to the recipe or pass --set {dotted}=..."
    shown = json.dumps(value, default=str) if value is not None else "null"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return (
        f"{source}: field {dotted!r} = {shown} is invalid: {error['msg']}; "
        f"fix it in the recipe or pass --set {dotted}=VALUE"
    )


def parse_recipe(data: Any, *, source: str = "recipe") -> CurateRecipe | TrainRecipe | EvalRecipe:
    """Validate a recipe dict; `source` (a path) prefixes every error message."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in _KINDS:
        close = difflib.get_close_matches(str(kind), list(_KINDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(
            f"{source}: field 'kind' = {kind!r} is invalid{hint}: "
            f"set kind to one of {', '.join(_KINDS)}"
        )
    try:
        return _RECIPE_ADAPTER.validate_python(data)
    except ValidationError as e:
        lines = [_describe(err, kind, source) for err in e.errors()]
        raise RecipeError("\n".join(lines)) from None


def load_recipe(
    path: str | Path, overrides: list[str] | None = None
) -> CurateRecipe | TrainRecipe | EvalRecipe:
    """Read a YAML recipe, apply `--set` overrides, validate."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file {str(p)!r} does not exist: check the path")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from None
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides)
    return parse_recipe(data, source=str(p))


#: Fields holding local paths or URLs, per kind (dotted; a list field is resolved item-wise).
_PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "curate": ("run_dir", "input.paths", "input.image_dir", "match.entries", "shard.output"),
    "train": ("run_dir", "data.dataset", "eval.zero_shot", "eval.retrieval"),
    "eval": ("run_dir", "checkpoint", "eval.zero_shot", "eval.retrieval"),
}


def _absolute(value: str) -> str:
    if "://" in value or not value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def resolve_paths(recipe: R) -> R:
    """The recipe with every relative path made absolute against the current directory.

    Recipes are written relative to where `kiln` runs, but Ray workers run in Ray's own
    session folder; resolving once, up front, means every process sees the same files.
    """
    data = recipe.model_dump(mode="json")
    if recipe.kind == "curate" and data.get("stages"):  # type: ignore[attr-defined]
        data["stages"] = [_resolve_stage_paths(spec) for spec in data["stages"]]
    for dotted in _PATH_FIELDS[recipe.kind]:  # type: ignore[attr-defined]
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node[part]
        value = node.get(leaf) if isinstance(node, dict) else None
        if isinstance(value, str):
            node[leaf] = _absolute(value)
        elif isinstance(value, list):
            node[leaf] = [_absolute(v) for v in value]
    return type(recipe).model_validate(data)


def _resolve_stage_paths(spec: dict[str, Any]) -> dict[str, Any]:
    """A `stages:` item with its path fields (`is_path_field`) made absolute."""
    from kiln.data_curation.stage import get_stage

    config = get_stage(spec["stage"]).config
    out = dict(spec)
    for name, info in config.model_fields.items():
        if is_path_field(info) and isinstance(out.get(name), str):
            out[name] = _absolute(out[name])
        elif is_path_field(info) and isinstance(out.get(name), dict):  # e.g. language -> file
            out[name] = {k: _absolute(v) if isinstance(v, str) else v for k, v in out[name].items()}
    return out


def recipe_hash(recipe: BaseModel) -> str:
    """sha256 of the recipe's canonical JSON: what a dataset or checkpoint was made with."""
    return json_sha256(recipe.model_dump(mode="json"))


def dump_recipe(recipe: BaseModel, path: str | Path) -> None:
    """Write the resolved recipe (defaults filled in) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
