"""The plan: a recipe's `stages:` list, validated into steps the runner executes in order.

Each item names a registered stage (`stage:`), optionally its step name (`name:`, default:
the stage name, unique in the plan: it names `steps/{name}/` and `rejects/{name}/`, so
inserting a stage never renames the others) and `resources:`; every other key is the
stage's own config. Checks made here, before anything runs: the stage exists, its config
validates (errors name the item, the field and the fix), step names are unique, and every
column a stage needs is added by an earlier stage or the reader.

A recipe keeps its `stages:` items as written (its hash is taken over them), so the paths
in them (`RecipePath` fields of the stages' configs) are resolved in place by
`resolve_spec_paths`, with the validation context that resolves the recipe's own paths.
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from kiln.contracts import PATH_NOTES
from kiln.data_curation.stage import Stage, StageResources, get_stage

__all__ = ["READER_COLUMNS", "PlanStep", "build_plan", "resolve_spec_paths", "step_names"]

#: Columns every reader produces (the sample schema plus `source_row`).
READER_COLUMNS = ("uid", "text", "url", "image", "width", "height", "source", "source_row")
_SPEC_KEYS = ("stage", "name", "resources")


@dataclass(frozen=True)
class PlanStep:
    """One step of the plan: a stage, its validated config, resources and step name."""

    name: str
    stage: Stage[Any]
    config: BaseModel
    resources: StageResources

    def config_json(self) -> dict[str, Any]:
        """The config as JSON values (what fingerprints and recorded recipes hold)."""
        return dict(self.config.model_dump(mode="json"))

    def spec(self) -> dict[str, Any]:
        """This step as a `stages:` item."""
        out: dict[str, Any] = {"stage": self.stage.name}
        if self.name != self.stage.name:
            out["name"] = self.name
        return {**out, **self.config_json()}


def _describe(where: str, error: Any, model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        valid = [*model.model_fields, *_SPEC_KEYS]
        close = difflib.get_close_matches(str(error["loc"][-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"valid fields: {', '.join(valid)}"
        return f"{where}: unknown field {loc!r}: {hint}"
    if error["type"] == "missing":
        return f"{where}: field {loc!r} is required: add it to the stage's entry"
    if error["type"] == "value_error" and not loc:  # a check across fields
        return f"{where}: {str(error['msg']).removeprefix('Value error, ')}"
    value = json.dumps(error.get("input"), default=str)
    if len(value) > 60:
        value = value[:57] + "..."
    return f"{where}: field {loc!r} = {value} is invalid: {error['msg']}"


def _validate(model: type[BaseModel], data: dict[str, Any], where: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ValueError("; ".join(_describe(where, err, model) for err in e.errors())) from None


def build_plan(specs: list[dict[str, Any]]) -> list[PlanStep]:
    """Validate a `stages:` list into `PlanStep`s (see module doc); ValueError on any mistake."""
    steps: list[PlanStep] = []  # an empty plan converts the pool to shards as it is
    earlier: list[tuple[str, Any]] = []
    columns = set(READER_COLUMNS)
    for i, raw in enumerate(specs):
        where = f"stages[{i}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("stage"), str):
            raise ValueError(
                f"{where} = {raw!r}: each stage is a mapping with a 'stage' key, e.g. "
                "{stage: text, min_chars: 3}"
            )
        try:
            stage = get_stage(raw["stage"])
        except KeyError as e:
            raise ValueError(f"{where}: {e.args[0]}") from None
        where = f"stages[{i}] ({stage.name})"
        name = raw.get("name") or stage.name
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{where}: name {name!r} must be a plain word (it names a folder)")
        if name in ("read", "shard") or any(s.name == name for s in steps):
            raise ValueError(
                f"{where}: step name {name!r} is already used: give this stage its own "
                "name: (step names must be unique and not 'read' or 'shard')"
            )
        resources = (
            _validate(StageResources, raw["resources"], f"{where} resources")
            if raw.get("resources") is not None
            else stage.resources
        )
        body = {k: v for k, v in raw.items() if k not in _SPEC_KEYS}
        config = _validate(stage.config, body, where)
        config = stage.link(config, earlier)
        missing = [c for c in stage.needs if c not in columns]
        if missing:
            raise ValueError(
                f"{where} needs the column(s) {', '.join(missing)}, which no earlier stage "
                "adds: move it after the stage that does (e.g. metaclip_balance after "
                "metaclip_match, image_dedup after image)"
            )
        columns.update(stage.adds)
        earlier.append((stage.name, config))
        steps.append(PlanStep(name=name, stage=stage, config=config, resources=resources))
    return steps


@functools.cache
def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    """Validates one field of `model` on its own (its type, constraints and sections)."""
    return TypeAdapter(model.model_fields[name].rebuild_annotation())


def _take_resolved(written: Any, plain: Any, resolved: Any) -> Any:
    """`written` with each string that validation with a path context changed (`resolved`
    differs from `plain`, validated without one) replaced by its resolved form; every other
    value as written. Markers of `--set` strings (`CwdRelative`) become plain strings."""
    if isinstance(written, dict) and isinstance(plain, dict) and isinstance(resolved, dict):
        return {k: _take_resolved(v, plain.get(k), resolved.get(k)) for k, v in written.items()}
    if (
        isinstance(written, list)
        and isinstance(plain, list)
        and isinstance(resolved, list)
        and len(written) == len(plain) == len(resolved)
    ):
        return [_take_resolved(*values) for values in zip(written, plain, resolved, strict=True)]
    if isinstance(written, str) and isinstance(resolved, str) and resolved != plain:
        return resolved
    return str(written) if isinstance(written, str) else written


def resolve_spec_paths(specs: Any, context: dict[str, Any]) -> Any:
    """`specs` (a `stages:` list as written) with the paths of each item resolved as
    validating its stage's config with `context` (see `kiln.contracts.RecipePath`) resolves
    them; every other value stays as written. Items and values that do not validate are
    left as they are for `build_plan` to report. Stages of `plugins:` must be loaded first."""
    if not isinstance(specs, list):
        return specs
    notes = context.get(PATH_NOTES)
    out: list[Any] = []
    for raw in specs:
        try:
            stage = get_stage(raw["stage"])
        except (KeyError, TypeError):  # not an item naming a known stage
            out.append(raw)
            continue
        item = dict(raw)
        for key, value in raw.items():
            if key in _SPEC_KEYS or key not in stage.config.model_fields:
                continue
            adapter = _field_adapter(stage.config, key)
            field_context = {**context, PATH_NOTES: []}
            try:
                plain = adapter.dump_python(adapter.validate_python(value), mode="json")
                resolved = adapter.dump_python(
                    adapter.validate_python(value, context=field_context), mode="json"
                )
            except ValidationError:
                continue
            item[key] = _take_resolved(value, plain, resolved)
            if isinstance(notes, list):  # a field validated on its own has no name: its key
                notes += [(name or key, *rest) for name, *rest in field_context[PATH_NOTES]]
        out.append(item)
    return out


def step_names(plan: list[PlanStep]) -> list[str]:
    """Every step the runner materializes, in order: read, the plan's steps, shard."""
    return ["read", *(s.name for s in plan), "shard"]
