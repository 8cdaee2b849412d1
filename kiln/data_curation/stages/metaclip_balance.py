"""MetaCLIP balancing stage (fit + apply): flatten the head of the entry distribution.

Fit: `count[e]`, the number of (alive) captions matching entry `e` over the whole pool, as
sparse per-task partial counts (entry id, count) merged into the persisted state. Apply:
each entry keeps a caption with probability `p[e] = min(1, t / count[e])`, and a caption is
kept when any of its entries keeps it (one Bernoulli trial per matched entry), i.e. with
probability `1 - prod(1 - p[e])`, written as `keep_prob`. Alive rows without an entry are
dropped as `no_metadata_match`, rows whose trials all fail as `not_sampled`.

Each trial's uniform draw is a pure function of (seed, uid, entry string) -- not of the
entry's position, so inserting a line in the entries file does not change the draws of
captions that did not change -- and of nothing else, so the result does not depend on
workers, block sizes or retries. Vectorized: each uid is hashed once, each entry once per
worker, with FNV-1a vectorized over the Arrow string buffer; the pairs are mixed in numpy
(`uniform_draw` is the scalar reference). The hash and the keep rule live in
`kiln.balancing`, which training's online balancing redraws with every epoch.

`t: null` keeps every matched caption (keep_prob 1): the matched set, with the pool's entry
counts written beside the dataset (`kiln.data_curation.balance_index`), for online balancing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from kiln.balancing import (
    any_entry_kept,
    entry_hashes,
    keep_probabilities,
    list_offsets,
    uid_hashes,
    uniform_draw,
    uniform_draws,
)
from kiln.contracts import RecipePath, StrictModel
from kiln.data_curation.matching import load_entries
from kiln.data_curation.stage import FitApplyStage, register
from kiln.data_curation.stages import alive_mask, mark_dropped, replace_column
from kiln.data_curation.stages.metaclip_match import ENTRY_IDS_COLUMN, entries_sha256

__all__ = [
    "KEEP_PROB_COLUMN",
    "BalanceConfig",
    "BalanceStage",
    "balance_effect",
    "balance_table",
    "dense_counts",
    "entry_hashes",
    "keep_probabilities",
    "merge_counts",
    "sparse_counts",
    "uid_hashes",
    "uniform_draw",
    "uniform_draws",
]

KEEP_PROB_COLUMN = "keep_prob"


class BalanceConfig(StrictModel):
    """MetaCLIP balancing: p(entry) = min(1, t / count(entry))."""

    t: int | None = Field(
        default=20_000,
        ge=1,
        description="per-entry count threshold; null: keep every matched caption (count "
        "only: drops the captions without an entry and writes the entry counts beside the "
        "dataset, the matched set that training's data.balance: {mode: online} balances "
        "every epoch, as MetaCLIP 1.2 stores it)",
    )
    seed: int = Field(default=0, description="seed of the balancing draws")
    entries: RecipePath | None = Field(
        default=None,
        description="entries file the captions were matched against (default: the plan's "
        "metaclip_match entries); draws are keyed by the entry strings",
    )


def _entry_ids(table: pa.Table) -> pa.ListArray:
    if ENTRY_IDS_COLUMN not in table.column_names:
        raise ValueError(
            f"table has no {ENTRY_IDS_COLUMN!r} column: run the metaclip_match stage before "
            "metaclip_balance"
        )
    column = table.column(ENTRY_IDS_COLUMN).combine_chunks()
    if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
        raise ValueError(f"column {ENTRY_IDS_COLUMN!r} has type {column.type}, expected list")
    return column


def sparse_counts(table: pa.Table) -> pa.Table:
    """(entry_id int32, count int64) over the alive rows of `table`, ids ascending, no zeros."""
    column = _entry_ids(table)
    alive = pa.array(alive_mask(table), type=pa.bool_())
    flat = pc.list_flatten(column.filter(alive)).to_numpy(zero_copy_only=False)
    ids, counts = np.unique(flat.astype(np.int64, copy=False), return_counts=True)
    return pa.table(
        {
            "entry_id": pa.array(ids.astype(np.int32), pa.int32()),
            "count": pa.array(counts.astype(np.int64), pa.int64()),
        }
    )


def merge_counts(partials: list[pa.Table]) -> pa.Table:
    """Sum sparse partial counts by entry id (order-free); ids ascending."""
    parts = [p for p in partials if p.num_rows]
    if not parts:
        return pa.table({"entry_id": pa.array([], pa.int32()), "count": pa.array([], pa.int64())})
    merged = pa.concat_tables(parts).group_by("entry_id").aggregate([("count", "sum")])
    merged = merged.rename_columns(["entry_id", "count"]).sort_by("entry_id")
    return merged.cast(pa.schema([("entry_id", pa.int32()), ("count", pa.int64())]))


def dense_counts(sparse: pa.Table, num_entries: int) -> np.ndarray:
    """Sparse counts as a dense int64 vector of length `num_entries`."""
    counts = np.zeros(num_entries, dtype=np.int64)
    if sparse.num_rows:
        ids = sparse.column("entry_id").to_numpy().astype(np.int64)
        if ids.min() < 0 or ids.max() >= num_entries:
            raise ValueError(
                f"entry id out of range [0, {num_entries}): the counts come from another "
                "entries file than the one given"
            )
        counts[ids] = sparse.column("count").to_numpy()
    return counts


def balance_table(table: pa.Table, probs: np.ndarray, entry_h: np.ndarray, seed: int) -> pa.Table:
    """MetaCLIP balancing with per-entry keep probabilities `probs` and entry hashes
    `entry_h` (both indexed by entry id); adds `keep_prob: float64` (see module doc)."""
    if "uid" not in table.column_names:
        raise ValueError("table has no 'uid' column: balancing draws are keyed by uid")
    column = _entry_ids(table)
    n = table.num_rows
    offsets, flat = list_offsets(column)
    lengths = np.diff(offsets)
    if flat.size and (flat.min() < 0 or flat.max() >= probs.shape[0]):
        raise ValueError(
            f"entry id outside [0, {probs.shape[0]}): counts must come from the same entry "
            "list as entry_ids"
        )
    keep_prob = np.zeros(n, dtype=np.float64)
    nonempty = lengths > 0
    if flat.size:
        keep_prob[nonempty] = 1.0 - np.multiply.reduceat(1.0 - probs[flat], offsets[:-1][nonempty])
    alive = alive_mask(table)
    trial = alive & nonempty
    not_sampled = np.zeros(n, dtype=bool)
    if trial.any():
        uids = table.column("uid")
        if uids.null_count and (trial & uids.is_null().to_numpy(zero_copy_only=False)).any():
            raise ValueError("a row has a null uid: every row needs a string uid")
        kept = any_entry_kept(uid_hashes(uids, seed), offsets, flat, probs, entry_h)
        not_sampled = trial & ~kept
    table = replace_column(table, KEEP_PROB_COLUMN, pa.array(keep_prob, type=pa.float64()))
    table = mark_dropped(table, alive & ~nonempty, "no_metadata_match")
    return mark_dropped(table, not_sampled, "not_sampled")


def balance_effect(
    entries: list[str], before: np.ndarray, after: np.ndarray, top: int = 5
) -> dict[str, Any]:
    """How balancing flattened the entry distribution: the head entries' counts before and
    after, and the largest count over the median matched entry's (the head/tail ratio)."""
    order = np.argsort(-before, kind="stable")[:top]
    matched = before > 0

    def ratio(c: np.ndarray) -> float:
        med = float(np.median(c[matched])) if matched.any() else 0.0
        return round(float(c.max()) / med, 2) if med > 0 else 0.0

    return {
        "top": [[entries[i], int(before[i]), int(after[i])] for i in order if before[i] > 0],
        "max_over_median": [ratio(before), ratio(after)],
    }


@dataclass(frozen=True)
class _Prepared:
    probs: np.ndarray
    entry_h: np.ndarray


class BalanceStage(FitApplyStage[BalanceConfig]):
    """MetaCLIP balancing: global entry counts (fit), then seeded per-entry trials (apply)."""

    name = "metaclip_balance"
    config = BalanceConfig
    summary = "MetaCLIP balancing: keep each entry's captions with p = min(1, t / count)"
    needs = (ENTRY_IDS_COLUMN,)
    adds = (KEEP_PROB_COLUMN,)
    drop_reasons: ClassVar[dict[str, str]] = {
        "no_metadata_match": "the caption matches no metadata entry",
        "not_sampled": "balancing did not sample the caption (its entries are over t)",
    }

    def link(self, cfg: BalanceConfig, earlier: list[tuple[str, Any]]) -> BalanceConfig:
        """Take `entries` from the last metaclip_match stage before this one."""
        if cfg.entries is not None:
            return cfg
        for stage, other in reversed(earlier):
            if stage == "metaclip_match":
                return cfg.model_copy(update={"entries": other.entries})
        raise ValueError(
            "metaclip_balance needs the entries file: put a metaclip_match stage before it "
            "or set its entries"
        )

    def check(self, cfg: BalanceConfig) -> dict[str, Any]:
        assert cfg.entries is not None
        return {"entries_sha256": entries_sha256(cfg.entries)}

    def setup(self, cfg: BalanceConfig, state: pa.Table | None) -> _Prepared | None:
        if state is None:
            return None
        assert cfg.entries is not None
        entries = load_entries(cfg.entries)
        probs = keep_probabilities(dense_counts(state, len(entries)), cfg.t)
        return _Prepared(probs=probs, entry_h=entry_hashes(entries))

    def fit(self, table: pa.Table, cfg: BalanceConfig, ctx: Any) -> pa.Table:
        return sparse_counts(table)

    def merge(self, partials: list[pa.Table], cfg: BalanceConfig) -> pa.Table:
        return merge_counts(partials)

    def apply(self, table: pa.Table, cfg: BalanceConfig, ctx: _Prepared) -> pa.Table:
        return balance_table(table, ctx.probs, ctx.entry_h, cfg.seed)

    def summarize(self, kept: pa.Table, cfg: BalanceConfig, ctx: Any) -> pa.Table | None:
        return sparse_counts(kept)

    def report(
        self, summaries: list[pa.Table], cfg: BalanceConfig, state: pa.Table | None
    ) -> dict[str, Any]:
        assert cfg.entries is not None and state is not None
        entries = load_entries(cfg.entries)
        before = dense_counts(state, len(entries))
        after = dense_counts(merge_counts(summaries), len(entries))
        return {
            "entries_matched": int((before > 0).sum()),
            "entry_counts": balance_effect(entries, before, after),
        }


register(BalanceStage())
