"""Typed configuration of a curation run: input, the plan (stages), shards, execution.

A curate recipe is these sections plus the job fields (`kind`, `name`, `run_dir`,
`resources`) that `kiln.platform.recipes` adds. Each stage's own config lives in its module
under `kiln.data_curation.stages` (re-exported here for the default plan's sections).
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import fsspec
from pydantic import Field, ValidationInfo, field_validator, model_validator

from kiln.contracts import PATH_BASE, RecipePath, StrictModel
from kiln.data_curation.plan import PlanStep, build_plan, resolve_spec_paths
from kiln.data_curation.stage import load_plugins
from kiln.data_curation.stages.image import ImageConfig
from kiln.data_curation.stages.metaclip_balance import BalanceConfig
from kiln.data_curation.stages.metaclip_match import MatchConfig
from kiln.data_curation.stages.text import TextConfig

__all__ = [
    "BalanceConfig",
    "CurationConfig",
    "ExecutionConfig",
    "ImageConfig",
    "ImageSection",
    "InputConfig",
    "MatchConfig",
    "PlantConfig",
    "ShardConfig",
    "SyntheticPoolConfig",
    "TextConfig",
    "TextSection",
    "default_plan_specs",
    "missing_folder",
]


class PlantConfig(StrictModel):
    """Corruption planted in the synthetic pool, with its ground truth, so pruning can be
    scored: near-duplicates (re-encoded, slightly cropped, recoloured copies of a clean row,
    with its caption or a paraphrase) and mismatched captions (a clean image captioned with
    another concept). The uids of what was planted go to `planted.json` beside the pool."""

    near_duplicates: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="near-duplicate copies to add, as a share of num_samples (added on top)",
    )
    mismatched: float = Field(
        default=0.0,
        ge=0,
        le=0.9,
        description="share of num_samples whose caption is swapped for another concept's",
    )
    seed: int = Field(default=0, description="seed of the planting (its own RNG stream)")


class SyntheticPoolConfig(StrictModel):
    """The procedural image-text pool of the demo (no download, no license)."""

    num_samples: int = Field(default=3000, ge=10, description="raw pool rows to generate")
    num_eval: int = Field(default=300, ge=0, description="held-out labelled images for eval")
    image_size: int = Field(default=64, ge=16, le=512, description="side of each image, pixels")
    seed: int = Field(default=0, description="seed of every draw: the same seed, the same pool")
    junk_fraction: float = Field(
        default=0.08, ge=0, le=1, description="share of captions that are junk alt-texts"
    )
    duplicate_fraction: float = Field(
        default=0.05, ge=0, le=1, description="share of rows that repeat an earlier sample"
    )
    bad_image_fraction: float = Field(
        default=0.01, ge=0, le=1, description="share of rows whose image bytes cannot decode"
    )
    rows_per_file: int = Field(default=1000, ge=1, description="rows per generated parquet file")
    plant: PlantConfig | None = Field(
        default=None,
        description="plant scored near-duplicates and mismatched captions (None: the plain "
        "pool, byte-identical to earlier versions)",
        exclude_if=lambda v: v is None,  # absent from dumps: the default pool's hash is kept
    )


class InputConfig(StrictModel):
    """Where the raw pool is and how its columns map onto the sample schema."""

    format: Literal["parquet", "jsonl", "csv", "webdataset", "synthetic"] = Field(
        description="how the pool is stored; synthetic generates the demo's procedural pool"
    )
    paths: list[RecipePath] = Field(
        default_factory=list,
        description="files, folders or globs (any fsspec URL); for synthetic, the pool folder",
    )
    text_column: str = Field(default="text", description="column holding the caption")
    text_columns: list[str] | None = Field(
        default=None,
        description="several texts per record (e.g. [alt, title]), instead of text_column: "
        "one row per text, all with the record's source_row; uids get '#column' when "
        "uid_column gives them (MetaCLIP 1 tests each; a caption_pick stage keeps one)",
    )
    url_column: str | None = Field(
        default="url", description="column holding the image URL (None: no URLs)"
    )
    uid_column: str | None = Field(
        default=None,
        description="column holding a unique sample id (webdataset: __key__ for the tar key); "
        "None: a hash of (url, caption)",
    )
    image_column: str | None = Field(
        default=None, description="column holding the image bytes (parquet; webdataset: jpg...)"
    )
    image_dir: RecipePath | None = Field(
        default=None,
        description="csv/jsonl: folder the image_path_column is relative to",
    )
    image_path_column: str | None = Field(
        default=None, description="csv/jsonl: column holding each image's path under image_dir"
    )
    allow_absolute_image_paths: bool = Field(
        default=False,
        description="let image_path_column hold absolute paths (on image_dir's filesystem); "
        "by default a path must lead inside image_dir, and absolute paths, '..' escapes and "
        "URLs drop the row as image_path_outside_dir",
    )
    max_member_bytes: int = Field(
        default=64 << 20,
        ge=1,
        description="webdataset: largest tar member kept, after .gz decompression; a sample "
        "with a bigger member is dropped as member_too_large (bounds what one member costs)",
    )
    synthetic: SyntheticPoolConfig = Field(
        default_factory=SyntheticPoolConfig, description="format synthetic: the pool to generate"
    )
    limit: int | None = Field(default=None, ge=1, description="read at most this many rows")

    @model_validator(mode="after")
    def _check(self) -> InputConfig:
        if not self.paths:
            raise ValueError(
                "input.paths is empty: list the pool's files, folders or globs "
                "(for format: synthetic, the folder to generate the pool into)"
            )
        if self.image_path_column and not self.image_dir:
            raise ValueError(
                "input.image_path_column is set but input.image_dir is not: "
                "set input.image_dir to the folder the image paths are relative to"
            )
        if self.image_dir and self.format != "synthetic":
            missing = missing_folder(self.image_dir, local_only=True)
            if missing:
                raise ValueError(missing)
        return self

    @model_validator(mode="after")
    def _check_text_columns(self) -> InputConfig:
        columns = self.text_columns
        if columns is None:
            return self
        if not columns or len(set(columns)) != len(columns):
            raise ValueError(
                f"input.text_columns={columns}: list each text column once (at least one)"
            )
        if self.text_column != "text":  # (the default, which a dumped config repeats)
            raise ValueError(
                "input.text_column and input.text_columns are both set: keep one (text_columns "
                "reads several texts per record)"
            )
        return self


def missing_folder(image_dir: str, *, local_only: bool = False) -> str | None:
    """The error for an `input.image_dir` that is not a folder (None when it is one).

    `local_only` checks only local paths (what recipe validation does: no network there);
    the runner checks every URL before the read step starts.
    """
    fs, path = fsspec.core.url_to_fs(image_dir)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if local_only and not {"file", "local"} & set(protocols):
        return None
    if fs.isdir(path):
        return None
    what = "is a file, not a folder" if fs.exists(path) else "does not exist"
    return (
        f"input.image_dir={image_dir!r} {what}: set it to the folder the paths in "
        "input.image_path_column are relative to"
    )


class TextSection(TextConfig):
    """The default plan's `text:` section: the text stage's settings plus its dedup switch."""

    dedup: bool = Field(default=True, description="exact dedup of (url, text)")


class ImageSection(ImageConfig):
    """The default plan's `image:` section: the image stage's settings plus its dedup switch."""

    dedup: bool = Field(default=True, description="exact dedup by sha256 of the decoded pixels")


class ShardConfig(StrictModel):
    """WebDataset shard writing."""

    samples_per_shard: int = Field(default=1000, ge=1, description="samples per tar shard")
    output: RecipePath | None = Field(
        default=None,
        description="dataset folder; default {run_dir}/dataset",
    )


class ExecutionConfig(StrictModel):
    """Where and how the plan's tasks run. None of these change the result (the shards are
    the same bytes), only speed and memory."""

    executor: Literal["auto", "local", "ray"] = Field(
        default="auto",
        description="local: worker processes on this machine, no Ray started (the fastest "
        "start: one machine, CPU stages); ray: Ray tasks on the embedded Ray or the cluster "
        "at ray.address; auto: ray when ray.address is set, a stage needs GPUs or kiln "
        "already runs inside Ray, else local",
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        description="worker processes of the local executor (default: the CPUs kiln may use)",
    )

    rows_per_task: int = Field(
        default=50_000,
        ge=1,
        description="rows one task handles: step outputs (and parquet inputs, by row group) "
        "are cut into tasks of about this many rows; each task has its own completion marker",
    )
    batch_size: int = Field(
        default=4096,
        ge=1,
        description="rows per stage function call (a stage may ask for fewer: image: 256)",
    )
    key_buckets: int = Field(
        default=8,
        ge=1,
        description="hash partitions of a keyed stage (exact dedup); one task holds one "
        "partition's rows, so raise it for very large pools",
    )
    shard_rows_per_task: int = Field(
        default=100_000,
        ge=1,
        description="rows one shard-writing task sorts and writes (uid ranges of about this size)",
    )
    shard_bytes_per_task: int = Field(
        default=512 << 20,
        ge=1 << 20,
        description="bytes (uncompressed, images included) one shard-writing task holds at most",
    )


class CurationConfig(StrictModel):
    """A curation plan: the input, the stages in order, shard writing, execution knobs.

    `stages` lists the plan: each item names a registered stage (`stage: text`), optionally
    a step name (`name:`, default: the stage name; it names `steps/{name}/`) and
    `resources:`, and the stage's own settings. Without `stages`, the default MetaCLIP plan
    runs -- text, text_dedup, metaclip_match, metaclip_balance, image, image_dedup -- set by
    the sections `text`, `match`, `balance` and `image` (the form recipes had before plans).
    With `input.uid_column` set, a `uid_dedup` step runs first (uids must be unique).
    """

    input: InputConfig = Field(description="the raw pool: where it is and its columns")
    stages: list[dict[str, Any]] | None = Field(
        default=None, description="the plan: stages in order (default: the MetaCLIP plan)"
    )
    plugins: list[str] = Field(
        default_factory=list,
        description="modules that register extra stages (imported by the driver and workers)",
    )
    text: TextSection | None = Field(
        default=None, description="without stages: the default plan's text stage settings"
    )
    match: MatchConfig | None = Field(
        default=None, description="without stages: the default plan's metaclip_match settings"
    )
    balance: BalanceConfig | None = Field(
        default=None, description="without stages: the default plan's metaclip_balance settings"
    )
    image: ImageSection | None = Field(
        default=None, description="without stages: the default plan's image stage settings"
    )
    shard: ShardConfig = Field(
        default_factory=ShardConfig, description="how the dataset's shards are written"
    )
    write_rejects: bool = Field(default=True, description="keep dropped rows with drop_reason")
    execution: ExecutionConfig = Field(
        default_factory=ExecutionConfig,
        description="parallelism knobs; results never depend on them",
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve_stage_paths(cls, data: Any, info: ValidationInfo) -> Any:
        """Resolve the paths in `stages:` items, which stay dicts (a recipe's hash is over
        them as written), with the context that resolves the recipe's own `RecipePath`
        fields (`PATH_BASE`): each item's paths are its stage config's `RecipePath` fields,
        so `plugins:` are loaded first (a bad one is reported by validation)."""
        context = info.context
        if not (isinstance(data, dict) and isinstance(context, dict) and PATH_BASE in context):
            return data
        if not data.get("stages"):
            return data
        plugins = data.get("plugins")
        if isinstance(plugins, list):
            with contextlib.suppress(ValueError, TypeError):
                load_plugins([str(p) for p in plugins])
        return {**data, "stages": resolve_spec_paths(data["stages"], context)}

    @field_validator("text", "image", mode="before")
    @classmethod
    def _stage_config_as_section(cls, value: Any) -> Any:
        """Accept a stage's own config (`ImageConfig(...)`) where the section is expected."""
        return value.model_dump() if isinstance(value, StrictModel) else value

    @model_validator(mode="after")
    def _check_plan(self) -> CurationConfig:
        self.plan()  # every stage exists, every config validates, columns come in order
        return self

    def plan_specs(self) -> list[dict[str, Any]]:
        """The `stages:` list this config runs (the default plan when it has none), with
        `uid_dedup` first when `input.uid_column` is set and the list does not name it."""
        specs = self._listed_specs()
        uids_given = self.input.uid_column is not None and self.input.format != "synthetic"
        if uids_given and not any(
            isinstance(s, dict) and s.get("stage") == "uid_dedup" for s in specs
        ):
            specs.insert(0, {"stage": "uid_dedup"})
        return specs

    def _listed_specs(self) -> list[dict[str, Any]]:
        legacy = {k: getattr(self, k) for k in ("text", "match", "balance", "image")}
        if self.stages is not None:
            given = [k for k, v in legacy.items() if v is not None]
            if given:
                raise ValueError(
                    f"the recipe has both stages: and the section(s) {', '.join(given)}: "
                    "with a stages: list, put each stage's settings in its entry, e.g. "
                    "stages: [{stage: text, min_chars: 3}, {stage: metaclip_match, entries: "
                    "FILE}, {stage: metaclip_balance, t: 20000}]"
                )
            return [dict(s) for s in self.stages]
        if self.match is None:
            raise ValueError(
                "the recipe has no stages: list and no match.entries: add a plan, e.g. "
                "stages: [{stage: text}, {stage: text_dedup}, {stage: metaclip_match, "
                "entries: FILE}, {stage: metaclip_balance, t: 20000}, {stage: image}, "
                "{stage: image_dedup}], or set match.entries for the default MetaCLIP plan"
            )
        return default_plan_specs(
            text=self.text or TextSection(),
            match=self.match,
            balance=self.balance or BalanceConfig(),
            image=self.image or ImageSection(),
        )

    def plan(self) -> list[PlanStep]:
        """The validated plan (see `kiln.data_curation.plan`)."""
        load_plugins(self.plugins)
        return build_plan(self.plan_specs())


def default_plan_specs(
    *, text: TextSection, match: MatchConfig, balance: BalanceConfig, image: ImageSection
) -> list[dict[str, Any]]:
    """The MetaCLIP plan as a `stages:` list, from the pre-plan recipe sections."""
    specs: list[dict[str, Any]] = [
        {"stage": "text", **text.model_dump(mode="json", exclude={"dedup"})}
    ]
    if text.dedup:
        specs.append({"stage": "text_dedup"})
    specs.append({"stage": "metaclip_match", **match.model_dump(mode="json")})
    balance_spec = balance.model_dump(mode="json")  # t: null (count only) must survive
    if balance_spec.get("entries") is None:
        balance_spec.pop("entries", None)
    specs.append({"stage": "metaclip_balance", **balance_spec})
    specs.append({"stage": "image", **image.model_dump(mode="json", exclude={"dedup"})})
    if image.dedup:
        specs.append({"stage": "image_dedup"})
    return specs
