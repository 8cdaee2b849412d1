"""MetaCLIP matching stage: each caption's metadata entries, as sorted entry ids.

Adds `entry_ids: list<int32>` (ids are positions in the entries file, see `load_entries`).
Matching semantics are MetaCLIP's reference ones (`kiln.data_curation.matching`) applied to
the `text` column as the earlier stages left it: with `text.normalize: true` (the default)
that is the normalized caption, with `normalize: false` the raw one, as MetaCLIP matches.
Entries that can never match normalized captions (NBSP, decomposed accents, double spaces)
are reported when the run starts.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from kiln.contracts import RecipePath, StrictModel, require_file, sha256_hex
from kiln.data_curation.matching import EntryMatcher, load_entries, unmatchable_entries
from kiln.data_curation.stage import MapStage, register
from kiln.data_curation.stages import alive_mask, replace_column

__all__ = ["ENTRY_IDS_COLUMN", "MatchConfig", "MatchStage", "entries_sha256", "match_table"]

logger = logging.getLogger("kiln.curation")

ENTRY_IDS_COLUMN = "entry_ids"


class MatchConfig(StrictModel):
    """MetaCLIP substring matching of captions against metadata entries."""

    normalized: bool | None = Field(
        default=None,
        description="whether captions arrive normalized (default: the plan's text stage's "
        "normalize); only decides which entries are reported as unmatchable",
    )

    entries: RecipePath = Field(
        description="text file, one metadata entry per line (any fsspec URL)",
    )


def entries_sha256(url: str) -> str:
    """sha256 of the entries file's bytes (what a match step's fingerprint covers)."""
    fs, path = require_file(
        url,
        f"metadata entries file {url!r} does not exist: set the metaclip_match stage's "
        "entries (or match.entries) to a text file with one entry per line",
    )
    with fs.open(path, "rb") as f:
        return sha256_hex(f.read())


def match_table(table: pa.Table, matcher: EntryMatcher) -> pa.Table:
    """Add `entry_ids: list<int32>`: matched entry ids per alive row, empty for dropped rows."""
    if "text" not in table.column_names:
        raise ValueError(
            f"table has no 'text' column (columns: {table.column_names}): map the caption "
            "column with input.text_column"
        )
    alive = pa.array(alive_mask(table), type=pa.bool_())
    texts = pc.if_else(alive, table.column("text").combine_chunks(), pa.scalar(None, pa.string()))
    match_arrow = getattr(matcher, "match_arrow", None)
    if match_arrow is not None:
        ids = match_arrow(texts)
    else:
        ids = pa.array(matcher.match_many(texts.to_pylist()), type=pa.list_(pa.int32()))
    return replace_column(table, ENTRY_IDS_COLUMN, ids)


class MatchStage(MapStage[MatchConfig]):
    """Captions x metadata entries -> `entry_ids` (no row is dropped here; balancing drops
    the rows without a match as `no_metadata_match`)."""

    name = "metaclip_match"
    config = MatchConfig
    summary = "MetaCLIP substring matching of captions against the metadata entries"
    adds = (ENTRY_IDS_COLUMN,)

    def link(self, cfg: MatchConfig, earlier: list[tuple[str, Any]]) -> MatchConfig:
        """`normalized` from the last text stage before this one (raw captions without one)."""
        if cfg.normalized is not None:
            return cfg
        texts = [c for stage, c in earlier if stage == "text"]
        return cfg.model_copy(update={"normalized": bool(texts and texts[-1].normalize)})

    def check(self, cfg: MatchConfig) -> dict[str, Any]:
        digest = entries_sha256(cfg.entries)
        entries = load_entries(cfg.entries)
        bad = unmatchable_entries(entries, normalized=bool(cfg.normalized))
        if bad:
            shown = ", ".join(f"{e!r} ({why})" for _i, e, why in bad[:3])
            hint = " or set the text stage's normalize: false" if cfg.normalized else ""
            logger.warning(
                "%s: %d of %d entries can never match the captions as they reach this stage, "
                "e.g. %s; fix them%s",
                cfg.entries,
                len(bad),
                len(entries),
                shown,
                hint,
            )
        return {"entries_sha256": digest, "entries": len(entries)}

    def setup(self, cfg: MatchConfig, state: pa.Table | None) -> EntryMatcher:
        return EntryMatcher(load_entries(cfg.entries))

    def apply(self, table: pa.Table, cfg: MatchConfig, ctx: EntryMatcher) -> pa.Table:
        return match_table(table, ctx)

    def summarize(self, kept: pa.Table, cfg: MatchConfig, ctx: Any) -> pa.Table | None:
        lengths = pc.list_value_length(kept.column(ENTRY_IDS_COLUMN)).fill_null(0)
        matched = int(pc.sum(pc.greater(lengths, 0)).as_py() or 0)
        return pa.table({"matched": pa.array([matched], pa.int64())})

    def report(
        self, summaries: list[pa.Table], cfg: MatchConfig, state: pa.Table | None
    ) -> dict[str, Any]:
        matched = sum(int(pc.sum(s.column("matched")).as_py() or 0) for s in summaries)
        return {"matched": matched}


register(MatchStage())
