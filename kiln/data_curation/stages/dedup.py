"""Exact dedup stages: one row per (url, text) key, per decoded-pixel hash, and per uid.

Both are keyed stages: the runner hash-partitions rows by key so every copy of a key lands
in one task, sorted by (key, uid, source, source_row). The first row of each run of equal
keys is kept, so the survivor is the copy with the smallest uid (then source, source_row),
whatever the number of workers, blocks or retries (for `uid_dedup`, whose key is the uid:
the first copy in (source file, row) order). The comparison is one vectorized pass
over the sorted keys, no per-row Python.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kiln.contracts import StrictModel
from kiln.data_curation.stage import KeyedStage, register
from kiln.data_curation.stages import mark_dropped
from kiln.data_curation.stages.text import text_dedup_key

__all__ = [
    "DedupConfig",
    "ImageDedupStage",
    "TextDedupStage",
    "UidDedupStage",
    "duplicate_mask",
]


class DedupConfig(StrictModel):
    """Exact dedup has no settings: include the stage in the plan to dedup, leave it out not to."""


def duplicate_mask(sorted_keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """True for every row whose key equals the previous row's (keys sorted, nulls never equal)."""
    keys = sorted_keys.combine_chunks() if isinstance(sorted_keys, pa.ChunkedArray) else sorted_keys
    n = len(keys)
    mask = np.zeros(n, dtype=bool)
    if n > 1:
        same = pc.equal(keys.slice(1), keys.slice(0, n - 1)).fill_null(False)
        mask[1:] = same.to_numpy(zero_copy_only=False)
    return mask


class _ExactDedup(KeyedStage[DedupConfig]):
    config = DedupConfig
    reason: str = ""

    def apply_groups(self, table: pa.Table, keys: pa.Array, cfg: DedupConfig, ctx: Any) -> pa.Table:
        return mark_dropped(table, duplicate_mask(keys), self.reason)


class TextDedupStage(_ExactDedup):
    """Exact dedup of (url, text): the normalized caption when `text.normalize` is on."""

    name = "text_dedup"
    reason = "duplicate_text"
    summary = "exact dedup of (url, caption)"
    drop_reasons: ClassVar[dict[str, str]] = {
        "duplicate_text": "another row has the same (url, caption)"
    }

    def key(self, table: pa.Table, cfg: DedupConfig, ctx: Any) -> pa.Array:
        return text_dedup_key(table)


class ImageDedupStage(_ExactDedup):
    """Exact dedup by `image_sha256` (decoded pixels), set by the `image` stage."""

    name = "image_dedup"
    reason = "duplicate_image"
    summary = "exact dedup by the hash of the decoded pixels (after the image stage)"
    needs = ("image_sha256",)
    drop_reasons: ClassVar[dict[str, str]] = {
        "duplicate_image": "another row has the same decoded pixels"
    }

    def key(self, table: pa.Table, cfg: DedupConfig, ctx: Any) -> pa.Array:
        return table.column("image_sha256").combine_chunks()


class UidDedupStage(_ExactDedup):
    """One row per uid: uids from `input.uid_column` must be unique to name shard samples.

    The plan runs it first, right after the read step, whenever `input.uid_column` is set
    (`CurationConfig.plan_specs`), so a pool that repeats a uid is settled before any other
    work instead of failing at the shard step; every repeat is counted and kept in the
    rejects table with its file and row."""

    name = "uid_dedup"
    reason = "duplicate_uid"
    summary = "one row per uid (runs first when input.uid_column is set)"
    drop_reasons: ClassVar[dict[str, str]] = {
        "duplicate_uid": "an earlier row (by source file, then row) has the same uid "
        "(input.uid_column)"
    }

    def key(self, table: pa.Table, cfg: DedupConfig, ctx: Any) -> pa.Array:
        return table.column("uid").combine_chunks()


register(TextDedupStage())
register(ImageDedupStage())
register(UidDedupStage())
