"""Typed configuration of a curation pipeline: one section per stage family.

A curate recipe is these sections plus the job fields (`kind`, `name`, `run_dir`,
`resources`) that `kiln.platform.recipes` adds; each stage takes only its own section.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kiln.contracts import StrictModel

__all__ = [
    "BalanceConfig",
    "CurationConfig",
    "ExecutionConfig",
    "ImageConfig",
    "InputConfig",
    "MatchConfig",
    "ShardConfig",
    "SyntheticPoolConfig",
    "TextConfig",
]


class SyntheticPoolConfig(StrictModel):
    """The procedural image-text pool of the demo (no download, no license)."""

    num_samples: int = Field(default=3000, ge=10, description="raw pool rows to generate")
    num_eval: int = Field(default=300, ge=0, description="held-out labelled images for eval")
    image_size: int = Field(default=64, ge=16, le=512)
    seed: int = 0
    junk_fraction: float = Field(default=0.08, ge=0, le=1)
    duplicate_fraction: float = Field(default=0.05, ge=0, le=1)
    bad_image_fraction: float = Field(default=0.01, ge=0, le=1)
    rows_per_file: int = Field(default=1000, ge=1)


class InputConfig(StrictModel):
    """Where the raw pool is and how its columns map onto the sample schema."""

    format: Literal["parquet", "jsonl", "csv", "webdataset", "synthetic"]
    paths: list[str] = Field(
        default_factory=list,
        description="files, folders or globs (any fsspec URL); for synthetic, the pool folder",
    )
    text_column: str = "text"
    url_column: str | None = "url"
    uid_column: str | None = None
    image_column: str | None = None
    image_dir: str | None = Field(
        default=None, description="csv/jsonl: folder the image_path_column is relative to"
    )
    image_path_column: str | None = None
    synthetic: SyntheticPoolConfig = Field(default_factory=SyntheticPoolConfig)
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
        return self


class TextConfig(StrictModel):
    """Caption normalization and filters."""

    normalize: bool = Field(default=True, description="Unicode NFC, strip, collapse whitespace")
    min_chars: int = Field(default=2, ge=0)
    max_chars: int = Field(default=1000, ge=1)
    min_words: int = Field(default=1, ge=0)
    drop_junk: bool = Field(
        default=True, description="drop filename-like and boilerplate alt-texts ('IMG_2041.jpg')"
    )
    dedup: bool = Field(default=True, description="exact dedup of (url, text)")


class MatchConfig(StrictModel):
    """MetaCLIP substring matching of captions against metadata entries."""

    entries: str = Field(description="text file, one metadata entry per line (any fsspec URL)")


class BalanceConfig(StrictModel):
    """MetaCLIP balancing: p(entry) = min(1, t / count(entry))."""

    t: int = Field(default=20_000, ge=1, description="per-entry count threshold")
    seed: int = 0


class ImageConfig(StrictModel):
    """Image decode check, size filters, re-encoding for shards."""

    required: bool = Field(default=True, description="drop rows with no image bytes")
    min_size: int = Field(default=16, ge=1, description="minimum of width and height, pixels")
    max_aspect_ratio: float = Field(default=3.0, ge=1.0)
    max_size: int | None = Field(
        default=None, ge=16, description="resize so the longer side is at most this (None: keep)"
    )
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    dedup: bool = Field(default=True, description="exact dedup by sha256 of the decoded pixels")


class ShardConfig(StrictModel):
    """WebDataset shard writing."""

    samples_per_shard: int = Field(default=1000, ge=1)
    output: str | None = Field(
        default=None, description="dataset folder; default {run_dir}/dataset"
    )


class ExecutionConfig(StrictModel):
    """How the pipeline runs on Ray. None of these change the result, only speed and memory."""

    num_blocks: int | None = Field(
        default=None,
        ge=1,
        description="blocks each step reads its input as (None: Ray Data decides)",
    )
    batch_size: int = Field(default=256, ge=1, description="rows per stage batch")
    match_actors: int = Field(
        default=1, ge=1, description="actors in the MetaCLIP matcher pool (each builds it once)"
    )
    actor_num_cpus: float = Field(
        default=0.5,
        gt=0,
        description="CPUs each matcher actor reserves; keep it fractional so the actor pool "
        "never takes every CPU (Ray Data's other tasks would wait forever)",
    )
    dedup_buckets: int = Field(
        default=8,
        ge=1,
        description="hash partitions of the exact-dedup keys; a dedup task holds one "
        "partition's keys in memory, so raise it for very large pools",
    )


class CurationConfig(StrictModel):
    """Every section of a curation pipeline."""

    input: InputConfig
    text: TextConfig = Field(default_factory=TextConfig)
    match: MatchConfig
    balance: BalanceConfig = Field(default_factory=BalanceConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    write_rejects: bool = Field(default=True, description="keep dropped rows with drop_reason")
    execution: ExecutionConfig = Field(
        default_factory=ExecutionConfig,
        description="Ray parallelism knobs; results never depend on them",
    )
