"""The stage contract: what a curation stage is, and the registry the plan looks stages up in.

A stage is one module under `kiln.data_curation.stages`: a pydantic config, the drop reasons
it may emit, its resources, and pure functions over Arrow tables of sample rows, in one of
three kinds:

- `MapStage`: `apply(table) -> table`, row by row (filters, normalizers, matchers, models);
- `FitApplyStage`: `fit(table) -> partial` per task, `merge(partials) -> state` (small: entry
  counts, centroids, a threshold; persisted beside the step), then `apply` with the state;
- `KeyedStage`: `key(table)` per row; the runner brings every row of a key into one task,
  sorted by (key, uid, source, source_row), and calls `apply_groups` once per task. A keyed
  stage may fit first (`fits = True`: k-means centroids, whose nearest one is the key) and
  have columns travel with the keys (`carry`: the embeddings SemDeDup compares).

A fitted stage's `merge` combines partials (per task, then across tasks) and `finish` turns
the merged partials into the persisted state once (e.g. k-means on a merged sample).

Functions never remove rows: a rejected row gets a `drop_reason` (`mark_dropped`) and the
runner counts and keeps it. Per-worker setup (building a matcher, loading a model or a fitted
state) goes in `setup`, whose result is passed to every call as `ctx`. Results must not
depend on how rows are split into tasks or batches: randomness comes from (seed, uid).

Adding a stage is one module plus `register(MyStage())`; the runner never changes for it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, Literal, TypeVar

import pyarrow as pa
from pydantic import BaseModel, Field

from kiln.contracts import StrictModel, drop_reasons, register_drop_reason

__all__ = [
    "FitApplyStage",
    "KeyedStage",
    "MapStage",
    "Stage",
    "StageKind",
    "StageResources",
    "get_stage",
    "known_drop_reasons",
    "load_plugins",
    "register",
    "registered_stages",
]

StageKind = Literal["map", "fit_apply", "keyed"]
C = TypeVar("C", bound=BaseModel)


class StageResources(StrictModel):
    """What one task of a stage needs. `actors` runs the stage in a pool of that many actors
    (each runs `setup` once); None runs plain tasks (setup once per worker process)."""

    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per task or actor")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per task or actor")
    actors: int | None = Field(
        default=None, ge=1, description="actor pool size (None: stateless tasks)"
    )


class Stage(Generic[C]):
    """Base of the three stage kinds. Subclasses set the class attributes and override the
    functions of their kind; every function is pure given (table, cfg, ctx)."""

    #: Registry name; also the default step name (`steps/{name}/`).
    name: ClassVar[str]
    kind: ClassVar[StageKind]
    #: The stage's pydantic config class (validated from the recipe's `stages:` entry).
    config: ClassVar[type[BaseModel]]
    #: Drop reasons the stage may emit, with what each means (registered on `register`).
    drop_reasons: ClassVar[Mapping[str, str]] = {}
    #: Default resources; a recipe may override them per stage (`resources:`).
    resources: ClassVar[StageResources] = StageResources()
    #: Bump when the stage's output changes for the same config: invalidates finished steps.
    version: ClassVar[int] = 1
    #: One line for listings of the available stages.
    summary: ClassVar[str] = ""
    #: Columns the stage reads that some earlier stage must add (the reader gives uid,
    #: text, url, image, width, height, source, source_row): the plan is checked up front.
    needs: ClassVar[tuple[str, ...]] = ()
    #: Columns the stage adds or replaces.
    adds: ClassVar[tuple[str, ...]] = ()
    #: Whether the stage reads or changes image bytes: only then does the runner load the
    #: `image` column for it (rows otherwise carry a reference, `kiln.data_curation.blobs`).
    images: ClassVar[bool] = False
    #: Rows per call the stage wants (None: `execution.batch_size`): vectorized stages run
    #: best on thousands of rows, image stages want few (decoded images are large).
    batch_rows: ClassVar[int | None] = None

    def link(self, cfg: C, earlier: list[tuple[str, Any]]) -> C:
        """The config completed from the stages before it in the plan ((stage name, config)
        pairs, in order): e.g. balancing takes the entries file of the matching stage."""
        return cfg

    def check(self, cfg: C) -> dict[str, Any]:
        """Validate what pydantic cannot (files exist, models load) in the driver, before any
        work starts; return what else the step's fingerprint must cover (e.g. the sha256 of
        an entries file), as JSON-able values."""
        return {}

    def setup(self, cfg: C, state: pa.Table | None) -> Any:
        """Per worker (or actor) context: a matcher, a model, the fitted state prepared for
        `apply`. `state` is the merged fit state for `FitApplyStage.apply`, else None."""
        return None

    def summarize(self, kept: pa.Table, cfg: C, ctx: Any) -> pa.Table | None:
        """Optional per-task partial report over the task's kept output rows (small)."""
        return None

    def report(self, summaries: list[pa.Table], cfg: C, state: pa.Table | None) -> dict[str, Any]:
        """Step extras (JSON-able) from the tasks' `summarize` tables and the fitted state."""
        return {}


class MapStage(Stage[C]):
    """A pure function over an Arrow batch of rows."""

    kind: ClassVar[StageKind] = "map"

    def apply(self, table: pa.Table, cfg: C, ctx: Any) -> pa.Table:
        raise NotImplementedError(f"stage {self.name!r} does not define apply")


class _Fitted(Stage[C]):
    """The fit half shared by `FitApplyStage` and fitted `KeyedStage`s."""

    def fit(self, table: pa.Table, cfg: C, ctx: Any) -> pa.Table:
        raise NotImplementedError(f"stage {self.name!r} does not define fit")

    def merge(self, partials: list[pa.Table], cfg: C) -> pa.Table:
        raise NotImplementedError(f"stage {self.name!r} does not define merge")

    def finish(self, merged: pa.Table, cfg: C) -> pa.Table:
        """The persisted state from the merge of every partial (called once, on a worker):
        by default the merged partials themselves."""
        return merged


class FitApplyStage(_Fitted[C]):
    """`fit` reduces each task's rows to a small partial table, `merge` combines partials
    (it must be associative and order-free), `finish` makes the persisted state of the
    merged partials, `apply` maps with it."""

    kind: ClassVar[StageKind] = "fit_apply"

    def apply(self, table: pa.Table, cfg: C, ctx: Any) -> pa.Table:
        raise NotImplementedError(f"stage {self.name!r} does not define apply")


class KeyedStage(_Fitted[C]):
    """Rows grouped by a key: `key` gives each row's key (null: the row joins no group).
    Only the keys travel: `apply_groups` sees, for every row of its keys, the columns uid,
    source, source_row, the `carry` columns (and the row's position), sorted by (key, uid,
    source, source_row) so groups are contiguous runs, and marks drops; the runner writes
    the reasons back onto the full rows, which never leave their task. With `fits = True`
    the runner first fits (`fit`, `merge`, `finish`) and gives the state to `setup`."""

    kind: ClassVar[StageKind] = "keyed"
    #: Whether the stage fits a state before the rows are keyed.
    fits: ClassVar[bool] = False

    def carry(self, cfg: C) -> tuple[str, ...]:
        """Columns besides uid, source, source_row that `apply_groups` needs."""
        return ()

    def summarize_groups(
        self, marked: pa.Table, keys: pa.Array, cfg: C, ctx: Any
    ) -> pa.Table | None:
        """Optional partial report of one group task (`apply_groups`'s output and the keys),
        passed to `report` with the other summaries."""
        return None

    def key(self, table: pa.Table, cfg: C, ctx: Any) -> pa.Array:
        raise NotImplementedError(f"stage {self.name!r} does not define key")

    def apply_groups(self, table: pa.Table, keys: pa.Array, cfg: C, ctx: Any) -> pa.Table:
        raise NotImplementedError(f"stage {self.name!r} does not define apply_groups")


_REGISTRY: dict[str, Stage[Any]] = {}


def register(stage: Stage[Any]) -> Stage[Any]:
    """Add `stage` to the registry under `stage.name` and register its drop reasons."""
    name = getattr(stage, "name", "")
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"stage name {name!r}: use a snake_case name")
    if getattr(stage, "kind", None) not in ("map", "fit_apply", "keyed"):
        raise ValueError(f"stage {name!r}: subclass MapStage, FitApplyStage or KeyedStage")
    known = _REGISTRY.get(name)
    if known is not None and type(known) is not type(stage):
        raise ValueError(f"stage name {name!r} is already registered by {type(known).__name__}")
    for reason, description in stage.drop_reasons.items():
        register_drop_reason(reason, description)
    _REGISTRY[name] = stage
    return stage


def _load_builtin() -> None:
    import kiln.data_curation.stages.builtin  # noqa: F401  (registers on import)


def registered_stages() -> dict[str, Stage[Any]]:
    """Every registered stage by name (the built-in ones are loaded on first use)."""
    _load_builtin()
    return dict(_REGISTRY)


def load_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import the modules that register extra stages (a recipe's `plugins:`); every Ray
    worker does the same before it looks a stage up, so they must be importable there."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(
                f"plugin module {module!r} cannot be imported ({e}): install it or put its "
                "folder on PYTHONPATH (Ray workers need to import it too)"
            ) from None


def known_drop_reasons() -> dict[str, str]:
    """Every registered drop reason (the built-in stages' included) and what it means."""
    _load_builtin()
    return drop_reasons()


def get_stage(name: str) -> Stage[Any]:
    """The stage registered as `name`; an error listing the valid names otherwise."""
    stages = registered_stages()
    if name in stages:
        return stages[name]
    close = difflib.get_close_matches(name, list(stages), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise KeyError(f"unknown stage {name!r}: {hint}valid stages: {', '.join(sorted(stages))}")
