"""Recipes: YAML job files validated by pydantic, with `--set a.b=c` overrides.

A recipe is one job: `kind` (curate | train | eval), `name`, `run_dir`, `resources`, `ray`
and the kind's own config sections. The same file runs locally or, later, on a cluster.
Every mistake in a recipe is reported as a `RecipeError` that names the field, the value
and the fix (for an unknown field: the closest valid name), never as a traceback.

Paths are `kiln.contracts.RecipePath` fields, which resolve themselves while a recipe is
validated: `load_recipe` validates a file's recipe against the file's folder, and marks
`--set` values (`CwdRelative`) so they resolve against the current directory;
`resolve_paths` resolves a recipe built in code against the current directory.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, model_validator

from kiln.contracts import (
    PATH_BASE,
    PATH_NOTES,
    CwdRelative,
    RecipePath,
    StrictModel,
    absolute_path,
    json_sha256,
)
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
    "missing_path_hint",
    "parse_recipe",
    "read_recipe_file",
    "recipe_hash",
    "resolve_paths",
    "show_recipe",
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
    cpus_per_worker: float = Field(
        default=1.0, gt=0, description="CPUs each rank reserves (and its intra-op threads)"
    )
    gpus_per_worker: float = Field(default=0.0, ge=0, description="GPUs each rank reserves")
    launcher: Launcher = Field(
        default="ray",
        description="how ranks start: ray (Ray Train workers), local (processes here), "
        "torchrun (this process is one rank of a torchrun / srun world)",
    )
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
    bind_cores: bool = Field(
        default=False,
        description="bind each rank to its own cpus_per_worker cores and its loader workers "
        "to the cores no rank uses (all of them when none are left): fewer preemptions of "
        "the rank on CPU. For a machine (or cpuset) the run has to itself: a bound rank "
        "cannot move away from another busy process",
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
    name: str = Field(min_length=1, description="the job's name (shown by `kiln runs`)")
    run_dir: RecipePath = Field(
        min_length=1,
        description="folder the job writes its outputs, recipe and status.json to",
    )
    resources: Resources = Field(
        default_factory=Resources, description="training ranks and how they start"
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="which Ray the job uses")


class CurateRecipe(_JobFields, CurationConfig):
    """`kind: curate`: raw pool -> curated WebDataset shards."""

    kind: Literal["curate"] = Field(description="the kind of job")

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

    kind: Literal["train"] = Field(description="the kind of job")


class EvalRecipe(_JobFields):
    """`kind: eval`: evaluate a checkpoint (a train run dir, a model.pt or an export)."""

    kind: Literal["eval"] = Field(description="the kind of job")
    checkpoint: RecipePath = Field(
        description="a train run dir (its latest checkpoint), a checkpoint folder, a model.pt "
        "or a .safetensors file from `kiln export`",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="what to evaluate on")


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


def _typed_here(value: Any) -> Any:
    """A `--set` value with each string in it marked `CwdRelative`: as a path, it is
    relative to the directory the command was typed in."""
    if isinstance(value, str):
        return CwdRelative(value)
    if isinstance(value, list):
        return [_typed_here(v) for v in value]
    if isinstance(value, dict):
        return {k: _typed_here(v) for k, v in value.items()}
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides to a nested dict (a copy); unknown keys are caught by
    validation. The strings they set are `CwdRelative` (paths relative to the cwd)."""
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
        node[parts[-1]] = _typed_here(_parse_value(raw))
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


def _nested_matches(model: type[BaseModel], loc: tuple[Any, ...], name: str) -> list[str]:
    """Dotted paths of fields close to `name` one section below `loc` (a field written one
    level too high, e.g. `model.image_size` for `model.vision.image_size`)."""
    parent = [str(p) for p in loc]
    found = []
    for section in _field_names(model, loc):
        fields = _field_names(model, (*loc, section))
        for match in difflib.get_close_matches(name, fields, n=1, cutoff=0.8):
            found.append(".".join([*parent, section, match]))
    return found


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
        nested = _nested_matches(model, loc[:-1], str(loc[-1]))
        if close:
            hint = f"did you mean {'.'.join([parent, close[0]]) if parent else close[0]!r}?"
        elif nested:  # e.g. model.image_size -> model.vision.image_size
            hint = f"did you mean {' or '.join(repr(n) for n in nested)}?"
        else:
            hint = f"valid fields here: {', '.join(valid)}"
        return f"{source}: unknown field {dotted!r}: {hint}"
    if etype == "value_error":
        where = (
            f"{dotted}: "
            if loc and not str(error["msg"]).startswith(f"Value error, {dotted}")
            else ""
        )
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


def parse_recipe(
    data: Any, *, source: str = "recipe", base: str | None = None
) -> CurateRecipe | TrainRecipe | EvalRecipe:
    """Validate a recipe dict; `source` (a path) prefixes every error message. With `base`
    (a folder), relative paths come back absolute against it (`CwdRelative` ones, from
    `--set`, against the cwd); without it, as they are (see `resolve_paths`)."""
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
        return _RECIPE_ADAPTER.validate_python(
            data, context=None if base is None else {PATH_BASE: base}
        )
    except ValidationError as e:
        lines = [_describe(err, kind, source) for err in e.errors()]
        raise RecipeError("\n".join(lines)) from None


def read_recipe_file(path: str | Path) -> tuple[Any, str]:
    """A recipe file's YAML as written, and the folder its relative paths are relative to
    (so a recipe runs the same from any directory). `path` may be a URL
    (``s3://bucket/recipes/train.yaml``): its relative paths then resolve against the URL's
    folder."""
    from kiln import storage

    text: str | None
    if storage.is_remote(path):
        storage.check_access(str(path))
        text, folder = storage.read_text(str(path)), str(path).rsplit("/", 1)[0]
    else:
        p = Path(path)
        text = p.read_text() if p.is_file() else None
        folder = os.path.dirname(os.path.abspath(p))
    if text is None:
        raise RecipeError(f"recipe file {str(path)!r} does not exist: check the path")
    try:
        return yaml.safe_load(text), folder
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None


def load_recipe(
    path: str | Path, overrides: list[str] | None = None
) -> CurateRecipe | TrainRecipe | EvalRecipe:
    """Read a YAML recipe, apply `--set` overrides, validate; paths come back absolute:
    the file's against its folder, the overrides' against the current directory."""
    data, folder = read_recipe_file(path)
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides)
    try:
        return parse_recipe(data, source=str(path), base=folder)
    except RecipeError as e:
        raise RecipeError(missing_path_hint(str(e), path, overrides)) from None


def resolve_paths(recipe: R) -> R:
    """The recipe with every relative path made absolute against the current directory.

    `load_recipe` has already resolved what the recipe file wrote (against its folder) and
    the `--set` values (against the cwd), so what is left relative here came from a recipe
    given as a dict or object. Ray workers run in Ray's own session folder; resolving once,
    up front, means every process sees the same files.
    """
    data = recipe.model_dump(mode="json")
    return type(recipe).model_validate(data, context={PATH_BASE: os.getcwd()})


def _written_at(node: Any, name: str, value: str, at: tuple[str | int, ...] = ()) -> list[str]:
    """Where in `node` (a recipe as written) the path field `name` holds `value`, dotted:
    `input.image_dir`, `stages.1.entries`, `stages.2.entries.en` (a map's entry); a list's
    items are named by their field (`input.paths`)."""
    if isinstance(node, dict):
        return [w for k, v in node.items() for w in _written_at(v, name, value, (*at, str(k)))]
    if isinstance(node, list):
        return [w for i, v in enumerate(node) for w in _written_at(v, name, value, (*at, i))]
    if node != value or name not in at:
        return []
    i = len(at) - 1 - at[::-1].index(name)
    key = [p for p in at[i + 1 : i + 2] if isinstance(p, str)]
    return [".".join(str(p) for p in (*at[: i + 1], *key))]


def missing_path_hint(
    message: str, recipe_file: str | Path | None, overrides: list[str] | None = None
) -> str:
    """`message` (an error naming a path) plus, for each relative path of the recipe file or
    of the `--set` overrides that it names once resolved, where it was written and the
    folder it was resolved against. Unchanged when it names none."""
    cwd = os.getcwd()
    found: list[str] = []
    if recipe_file and os.path.isfile(recipe_file):
        folder = os.path.dirname(os.path.abspath(recipe_file))
        data: Any = None
        notes: list[tuple[str, str, str]] = []  # (field name, as written, resolved)
        with contextlib.suppress(Exception):  # a hint only: never the error itself
            data = yaml.safe_load(Path(recipe_file).read_text())
            if isinstance(data, dict) and data.get("kind") in _KINDS:
                context = {PATH_BASE: folder, PATH_NOTES: notes}
                _RECIPE_ADAPTER.validate_python(data, context=context)
        for name, value, resolved in dict.fromkeys(notes):
            if resolved in message:
                found += [
                    f"{field}: {value!r} in {recipe_file} is resolved against the recipe's "
                    f"folder {folder}"
                    for field in _written_at(data, name, value)
                ]
    for item in overrides or []:
        key, _, raw = item.partition("=")
        values = _parse_value(raw)
        for value in values if isinstance(values, list) else [values]:
            is_relative = isinstance(value, str) and not os.path.isabs(value) and "://" not in value
            if is_relative and value and absolute_path(value, cwd) in message:
                found.append(
                    f"--set {key}: {value!r} is resolved against the current directory {cwd}"
                )
    found = list(dict.fromkeys(found))
    return message if not found else message + "\n(" + "; ".join(found) + ")"


def recipe_hash(recipe: BaseModel) -> str:
    """sha256 of the recipe's canonical JSON: what a dataset or checkpoint was made with."""
    return json_sha256(recipe.model_dump(mode="json"))


def show_recipe(recipe: CurateRecipe | TrainRecipe | EvalRecipe) -> str:
    """The recipe as it runs, as YAML that loads back to the same job: every default
    filled in, every path absolute, and a plan's stages with each stage's settings."""
    data = recipe.model_dump(mode="json")
    if isinstance(recipe, CurateRecipe) and recipe.stages is not None:
        given = {i: spec.get("resources") for i, spec in enumerate(recipe.plan_specs())}
        data["stages"] = [
            {**step.spec(), **({"resources": given[i]} if given.get(i) is not None else {})}
            for i, step in enumerate(recipe.plan())
        ]
    header = (
        f"# {recipe.kind} recipe {recipe.name!r} as it runs: defaults filled in, paths absolute\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def dump_recipe(recipe: BaseModel, path: str | Path) -> None:
    """Write the resolved recipe (defaults filled in) as YAML."""
    from kiln import storage

    text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    storage.atomic_write(path, text.encode())
