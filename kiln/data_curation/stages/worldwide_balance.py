"""MetaCLIP 2 ("worldwide") balancing: t per language keeps English's tail share.

`worldwide_balance` (fit + apply) counts matches per (language, entry), then computes each
language's threshold as MetaCLIP 2's reference does: `p = t_to_p(counts[ref], t)` is the
share of the reference language's matches that falls in its tail entries (count < t), and
`t_lang = p_to_t(counts[lang], p)` is the count at which the same share of that language's
matches is in its tail (the reference language keeps `t`). A language's t is at least 1.
Then rows are kept exactly as `metaclip_balance` keeps them (one seeded trial per matched
entry with `p = min(1, t_lang / count)`, draws keyed by (seed, uid, entry string)), so the
result does not depend on workers, blocks or retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from kiln.contracts import RecipePath, StrictModel
from kiln.data_curation.matching import load_entries
from kiln.data_curation.stage import FitApplyStage, register
from kiln.data_curation.stages import alive_mask, replace_column
from kiln.data_curation.stages.metaclip_balance import (
    KEEP_PROB_COLUMN,
    BalanceStage,
    balance_table,
    dense_counts,
    entry_hashes,
    keep_probabilities,
)
from kiln.data_curation.stages.metaclip_match import ENTRY_IDS_COLUMN
from kiln.data_curation.stages.worldwide_match import (
    METADATA_LANGUAGE_COLUMN,
    check_language,
    require_language_entries,
)

__all__ = [
    "WorldwideBalanceConfig",
    "WorldwideBalanceStage",
    "language_counts",
    "language_thresholds",
    "merge_language_counts",
    "p_to_t",
    "t_to_p",
    "tail_share",
]


def t_to_p(counts: np.ndarray, t: float) -> float:
    """Share of all matches that fall in tail entries (count < t): MetaCLIP 2's `t_to_p`."""
    counts = np.asarray(counts)
    return float(counts[counts < t].sum() / counts.sum())


def p_to_t(counts: np.ndarray, p: float) -> int:
    """The entry count at which the cumulative share of matches (entries sorted by count,
    ascending, zeros included) is closest to `p`: MetaCLIP 2's `p_to_t`."""
    ordered = np.sort(np.asarray(counts))
    portion = np.cumsum(ordered) / ordered.sum()
    return int(ordered[int(np.abs(portion - p).argmin())])


def tail_share(counts_after: np.ndarray, counts_before: np.ndarray, t: float) -> float:
    """Share of `counts_after`'s matches in the entries that were tail entries before
    balancing (count_before < t); 0 when there is none."""
    total = float(np.sum(counts_after))
    if total == 0:
        return 0.0
    return float(np.asarray(counts_after)[np.asarray(counts_before) < t].sum() / total)


def language_thresholds(
    counts: dict[str, np.ndarray], t: int, reference: str
) -> tuple[dict[str, int], float]:
    """(t per language with matches, the tail share p): `p = t_to_p(counts[reference], t)`,
    `t_lang = max(1, p_to_t(counts[lang], p))`, the reference language keeping `t`."""
    ref = counts.get(reference)
    if ref is None or ref.sum() == 0:
        raise ValueError(
            f"no caption matched the {reference!r} entry list, so its tail share "
            f"t_to_p(counts[{reference!r}], t) is undefined: set worldwide_balance."
            "reference_language to a language with matches (see worldwide_match's "
            "matched_by_language)"
        )
    p = t_to_p(ref, t)
    out = {}
    for code, c in sorted(counts.items()):
        if c.sum() == 0:
            continue
        out[code] = int(t) if code == reference else max(1, p_to_t(c, p))
    return out, p


_COUNT_SCHEMA = pa.schema(
    [("language", pa.string()), ("entry_id", pa.int32()), ("count", pa.int64())]
)


def merge_language_counts(partials: list[pa.Table]) -> pa.Table:
    """Sum (language, entry_id, count) partials (order-free); sorted by language, entry_id."""
    parts = [p for p in partials if p.num_rows]
    if not parts:
        return _COUNT_SCHEMA.empty_table()
    merged = (
        pa.concat_tables(parts).group_by(["language", "entry_id"]).aggregate([("count", "sum")])
    )
    merged = merged.select(["language", "entry_id", "count_sum"]).rename_columns(
        ["language", "entry_id", "count"]
    )
    merged = merged.sort_by([("language", "ascending"), ("entry_id", "ascending")])
    return merged.cast(_COUNT_SCHEMA)


def language_counts(table: pa.Table, *, rows: bool = False) -> pa.Table:
    """(language, entry_id, count) over the alive rows with a metadata language. With
    `rows`, each language also gets an `entry_id = -1` line counting its rows."""
    for column in (ENTRY_IDS_COLUMN, METADATA_LANGUAGE_COLUMN):
        if column not in table.column_names:
            raise ValueError(
                f"table has no {column!r} column: run worldwide_match before worldwide_balance"
            )
    meta = table.column(METADATA_LANGUAGE_COLUMN).combine_chunks()
    keep = pa.array(alive_mask(table) & np.asarray(meta.is_valid().to_numpy(zero_copy_only=False)))
    ids = table.column(ENTRY_IDS_COLUMN).combine_chunks().filter(keep)
    meta = meta.filter(keep)
    flat = pc.list_flatten(ids).cast(pa.int32())
    language = meta.take(pc.list_parent_indices(ids))
    if rows:
        language = pa.concat_arrays([language, meta])
        flat = pa.concat_arrays([flat, pa.array(np.full(len(meta), -1, np.int32))])
    ones = pa.array(np.ones(len(flat), dtype=np.int64))
    return merge_language_counts(
        [pa.table({"language": language, "entry_id": flat, "count": ones})]
    )


def _counts_by_language(state: pa.Table, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    out = {}
    for code in sorted(set(state.column("language").to_pylist())):
        mine = state.filter(pc.equal(state.column("language"), code))
        mine = mine.filter(pc.greater_equal(mine.column("entry_id"), 0))
        if code not in sizes:
            raise ValueError(
                f"the counts name language {code!r}, which has no entries file here: the "
                "fitted state comes from another language map"
            )
        out[code] = dense_counts(mine.select(["entry_id", "count"]), sizes[code])
    return out


class WorldwideBalanceConfig(StrictModel):
    """MetaCLIP 2 balancing: per-language t with the reference language's tail share."""

    t: int = Field(default=20_000, ge=1, description="threshold of the reference language")
    reference_language: str = Field(
        default="en", description="the language whose t is given (MetaCLIP 2: en, t_en)"
    )
    seed: int = Field(default=0, description="seed of the keep/drop draws")
    entries: dict[str, RecipePath] | None = Field(
        default=None,
        description="the language -> entries map the captions were matched with (default: "
        "the plan's worldwide_match entries)",
    )

    @model_validator(mode="after")
    def _check_reference(self) -> WorldwideBalanceConfig:
        check_language(self.reference_language, "reference_language")
        if self.entries is not None and self.reference_language not in self.entries:
            raise ValueError(
                f"reference_language {self.reference_language!r} has no entries file: add "
                f"it to worldwide_match's entries or pick one of {', '.join(sorted(self.entries))}"
            )
        return self


@dataclass(frozen=True)
class _Prepared:
    base: dict[str, int]  # language -> offset of its ids in the concatenated arrays
    probs: np.ndarray
    entry_h: np.ndarray
    t: dict[str, int]


class WorldwideBalanceStage(FitApplyStage[WorldwideBalanceConfig]):
    """Per-language counts (fit), per-language t, seeded per-entry trials (apply)."""

    name = "worldwide_balance"
    config = WorldwideBalanceConfig
    summary = "MetaCLIP 2 balancing: t per language keeps the reference language's tail share"
    needs = (ENTRY_IDS_COLUMN, METADATA_LANGUAGE_COLUMN)
    adds = (KEEP_PROB_COLUMN,)
    drop_reasons: ClassVar[dict[str, str]] = dict(BalanceStage.drop_reasons)

    def link(self, cfg: WorldwideBalanceConfig, earlier: list[tuple[str, Any]]) -> Any:
        """Take `entries` from the last worldwide_match stage before this one."""
        if cfg.entries is None:
            for stage, other in reversed(earlier):
                if stage == "worldwide_match":
                    data = {**cfg.model_dump(), "entries": dict(other.entries)}
                    return WorldwideBalanceConfig.model_validate(data)
            raise ValueError(
                "worldwide_balance needs the language -> entries map: put a worldwide_match "
                "stage before it or set its entries"
            )
        return cfg

    def _entries(self, cfg: WorldwideBalanceConfig) -> dict[str, list[str]]:
        assert cfg.entries is not None
        return {code: load_entries(url) for code, url in sorted(cfg.entries.items())}

    def check(self, cfg: WorldwideBalanceConfig) -> dict[str, Any]:
        assert cfg.entries is not None
        return {
            "entries_sha256": {
                code: require_language_entries(code, url)
                for code, url in sorted(cfg.entries.items())
            }
        }

    def fit(self, table: pa.Table, cfg: WorldwideBalanceConfig, ctx: Any) -> pa.Table:
        return language_counts(table)

    def merge(self, partials: list[pa.Table], cfg: WorldwideBalanceConfig) -> pa.Table:
        return merge_language_counts(partials)

    def setup(self, cfg: WorldwideBalanceConfig, state: pa.Table | None) -> _Prepared | None:
        if state is None:
            return None
        entries = self._entries(cfg)
        counts = _counts_by_language(state, {k: len(v) for k, v in entries.items()})
        t, _p = language_thresholds(counts, cfg.t, cfg.reference_language)
        base, probs, hashes, start = {}, [], [], 0
        for code in sorted(t):
            base[code] = start
            probs.append(keep_probabilities(counts[code], t[code]))
            hashes.append(entry_hashes(entries[code]))
            start += len(entries[code])
        return _Prepared(
            base=base,
            probs=np.concatenate(probs) if probs else np.ones(0),
            entry_h=np.concatenate(hashes) if hashes else np.zeros(0, np.uint64),
            t=t,
        )

    def apply(
        self, table: pa.Table, cfg: WorldwideBalanceConfig, ctx: _Prepared | None
    ) -> pa.Table:
        assert ctx is not None
        ids = table.column(ENTRY_IDS_COLUMN).combine_chunks()
        meta = table.column(METADATA_LANGUAGE_COLUMN).combine_chunks().to_pylist()
        row_base = np.array([ctx.base.get(m, 0) if m is not None else 0 for m in meta], np.int64)
        lengths = pc.list_value_length(ids).fill_null(0).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        shifted = flat + np.repeat(row_base, lengths)
        offsets = np.zeros(len(ids) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        global_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(shifted, pa.int32()))
        shifted_table = replace_column(table, ENTRY_IDS_COLUMN, global_ids)
        out = balance_table(shifted_table, ctx.probs, ctx.entry_h, cfg.seed)
        return replace_column(out, ENTRY_IDS_COLUMN, ids)

    def summarize(self, kept: pa.Table, cfg: WorldwideBalanceConfig, ctx: Any) -> pa.Table | None:
        return language_counts(kept, rows=True)

    def report(
        self, summaries: list[pa.Table], cfg: WorldwideBalanceConfig, state: pa.Table | None
    ) -> dict[str, Any]:
        assert state is not None
        entries = self._entries(cfg)
        sizes = {k: len(v) for k, v in entries.items()}
        before = _counts_by_language(state, sizes)
        after_table = merge_language_counts(summaries)
        kept_rows = after_table.filter(pc.equal(after_table.column("entry_id"), -1))
        after = _counts_by_language(after_table, sizes)
        t, p = language_thresholds(before, cfg.t, cfg.reference_language)
        return {
            "reference_language": cfg.reference_language,
            "tail_share": round(p, 6),
            "t_by_language": t,
            "kept_by_language": dict(
                zip(
                    kept_rows.column("language").to_pylist(),
                    kept_rows.column("count").to_pylist(),
                    strict=True,
                )
            ),
            "tail_share_after": {
                code: round(tail_share(after.get(code, np.zeros_like(c)), c, t[code]), 6)
                for code, c in before.items()
                if code in t
            },
        }


register(WorldwideBalanceStage())
