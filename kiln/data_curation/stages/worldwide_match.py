"""MetaCLIP 2 ("worldwide") matching: one entry list per language, the no-space rule.

`worldwide_match` (map) reads the `language` column of the language stage and matches each
caption against the entry list of its language (`entries: {en: FILE, de: FILE, ...}`, keys
are the language stage's codes). A caption in a language without a list is matched against
the `fallback` language's list when one is set (and counted as that language, as MetaCLIP
2's `other` list), else dropped as `no_metadata_for_language`. Matching applies MetaCLIP 2's
rule (`no_space: true`, `kiln.data_curation.matching.NoSpaceMatcher`): an entry whose
first / last character is CJK, Thai, Lao, Burmese, Khmer, Tibetan or punctuation is looked
for without the space padding on that side, so 狗 matches 我的狗很好; plain-word entries match
exactly as MetaCLIP 1 matches them. Adds `entry_ids` (ids in that language's list) and
`metadata_language` (the list's language); `worldwide_balance` balances per language.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from kiln.contracts import RecipePath, StrictModel, require_file, sha256_hex
from kiln.data_curation.matching import (
    EntryMatcher,
    NoSpaceMatcher,
    load_entries,
    unmatchable_entries,
)
from kiln.data_curation.stage import MapStage, register
from kiln.data_curation.stages import alive_mask, mark_dropped, replace_column
from kiln.data_curation.stages.language import LID_LANGUAGES
from kiln.data_curation.stages.metaclip_match import ENTRY_IDS_COLUMN

__all__ = [
    "METADATA_LANGUAGE_COLUMN",
    "WorldwideMatchConfig",
    "WorldwideMatchStage",
    "check_language",
    "match_languages",
    "require_language_entries",
]

logger = logging.getLogger("kiln.curation")

#: The language whose entry list a row was matched against (null: none).
METADATA_LANGUAGE_COLUMN = "metadata_language"


def check_language(code: str, where: str) -> None:
    """A clear error (naming `where`) for a code the language stage never gives."""
    if code in LID_LANGUAGES:
        return
    close = difflib.get_close_matches(code, sorted(LID_LANGUAGES), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(
        f"{where}: unknown language code {code!r}{hint}: use a code the language stage "
        "gives (fastText lid.176, e.g. en, de, zh, ja, th, ar)"
    )


class WorldwideMatchConfig(StrictModel):
    """MetaCLIP 2 matching: one entry list per language, the no-space rule."""

    entries: dict[str, RecipePath] = Field(
        description="language code (as the language stage gives it: en, de, zh, ...) -> "
        "entries file (any fsspec URL)",
    )
    fallback: str | None = Field(
        default=None,
        description="language (a key of entries) whose list matches captions in a language "
        "without one; null: drop them as no_metadata_for_language",
    )
    no_space: bool = Field(
        default=True,
        description="MetaCLIP 2's rule: no space padding next to a CJK / Thai / Lao / Burmese "
        "/ Khmer / Tibetan / punctuation character at an entry's edge (false: MetaCLIP 1)",
    )
    normalized: bool | None = Field(
        default=None,
        description="whether captions arrive normalized (default: the plan's text stage's "
        "normalize); only decides which entries are reported as unmatchable",
    )

    @model_validator(mode="after")
    def _check_codes(self) -> WorldwideMatchConfig:
        if not self.entries:
            raise ValueError(
                "entries is empty: map at least one language to its entries file, e.g. "
                "entries: {en: metadata/en.txt}"
            )
        for code in self.entries:
            check_language(code, "entries")
        if self.fallback is not None and self.fallback not in self.entries:
            raise ValueError(
                f"fallback {self.fallback!r} has no entries file: set it to one of "
                f"{', '.join(sorted(self.entries))} or add {self.fallback}: FILE to entries"
            )
        return self


def require_language_entries(code: str, url: str) -> str:
    """sha256 of language `code`'s entries file; an error naming both when it is missing."""
    fs, path = require_file(
        url,
        f"worldwide_match.entries: the file for language {code!r}, {url!r}, does not exist: "
        f"point {code} at a text file with one entry per line, or remove {code} from the map",
    )
    with fs.open(path, "rb") as f:
        return sha256_hex(f.read())


def _metadata_languages(table: pa.Table, cfg: WorldwideMatchConfig) -> pa.Array:
    """Per row: the language whose list it is matched against (null: none, or dropped)."""
    if "language" not in table.column_names:
        raise ValueError(
            "table has no 'language' column: put the language stage before worldwide_match"
        )
    language = table.column("language").combine_chunks().cast(pa.string())
    listed = pc.is_in(language, value_set=pa.array(sorted(cfg.entries), pa.string()))
    fallback = pa.scalar(cfg.fallback, pa.string())
    chosen = pc.if_else(pc.fill_null(listed, False), language, fallback)
    return pc.if_else(pa.array(alive_mask(table)), chosen, pa.scalar(None, pa.string()))


def _empty_lists(n: int) -> pa.ListArray:
    offsets = pa.array(np.zeros(n + 1, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array([], pa.int32()))


def match_languages(
    table: pa.Table, matchers: dict[str, Any], cfg: WorldwideMatchConfig
) -> pa.Table:
    """Add `entry_ids` and `metadata_language`; drop alive rows without a list."""
    meta = _metadata_languages(table, cfg)
    texts = table.column("text").combine_chunks()
    meta_values = np.asarray(meta.to_pylist(), dtype=object)
    parts: list[pa.Array] = []
    positions: list[np.ndarray] = []
    for code in sorted({m for m in meta_values if m is not None}):
        rows = np.flatnonzero(meta_values == code)
        parts.append(matchers[code].match_arrow(texts.take(pa.array(rows))))
        positions.append(rows)
    rest = np.flatnonzero(meta_values == None)  # noqa: E711  (elementwise on objects)
    parts.append(_empty_lists(rest.size))
    positions.append(rest)
    order = np.concatenate(positions)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    ids = pa.concat_arrays([p.cast(pa.list_(pa.int32())) for p in parts]).take(pa.array(inverse))
    table = replace_column(table, ENTRY_IDS_COLUMN, ids)
    table = replace_column(table, METADATA_LANGUAGE_COLUMN, meta)
    no_list = alive_mask(table) & np.asarray(meta.is_null().to_numpy(zero_copy_only=False))
    return mark_dropped(table, no_list, "no_metadata_for_language")


def _sum_by_language(summaries: list[pa.Table], column: str) -> dict[str, int]:
    parts = [s for s in summaries if s.num_rows]
    if not parts:
        return {}
    merged = pa.concat_tables(parts).group_by("language").aggregate([(column, "sum")])
    pairs = zip(
        merged.column("language").to_pylist(),
        merged.column(f"{column}_sum").to_pylist(),
        strict=True,
    )
    return {str(k): int(v) for k, v in sorted(pairs, key=lambda kv: str(kv[0]))}


class WorldwideMatchStage(MapStage[WorldwideMatchConfig]):
    """Captions x their language's entry list -> `entry_ids`, `metadata_language`."""

    name = "worldwide_match"
    config = WorldwideMatchConfig
    summary = "MetaCLIP 2 matching: one entry list per language, the no-space rule"
    needs = ("language",)
    adds = (ENTRY_IDS_COLUMN, METADATA_LANGUAGE_COLUMN)
    drop_reasons: ClassVar[dict[str, str]] = {
        "no_metadata_for_language": "the caption's language has no entry list (and no fallback)"
    }

    def link(self, cfg: WorldwideMatchConfig, earlier: list[tuple[str, Any]]) -> Any:
        """`normalized` from the last text stage before this one (raw captions without one)."""
        if cfg.normalized is not None:
            return cfg
        texts = [c for stage, c in earlier if stage == "text"]
        return cfg.model_copy(update={"normalized": bool(texts and texts[-1].normalize)})

    def check(self, cfg: WorldwideMatchConfig) -> dict[str, Any]:
        digests = {
            code: require_language_entries(code, url) for code, url in sorted(cfg.entries.items())
        }
        sizes = {}
        for code, url in sorted(cfg.entries.items()):
            entries = load_entries(url)
            sizes[code] = len(entries)
            bad = unmatchable_entries(entries, normalized=bool(cfg.normalized))
            if bad:
                logger.warning(
                    "%s (%s): %d of %d entries can never match, e.g. %s",
                    url,
                    code,
                    len(bad),
                    len(entries),
                    ", ".join(f"{e!r} ({why})" for _i, e, why in bad[:2]),
                )
        return {"entries_sha256": digests, "entries": sizes, "no_space": cfg.no_space}

    def setup(self, cfg: WorldwideMatchConfig, state: pa.Table | None) -> dict[str, Any]:
        kind = NoSpaceMatcher if cfg.no_space else EntryMatcher
        return {code: kind(load_entries(url)) for code, url in sorted(cfg.entries.items())}

    def apply(self, table: pa.Table, cfg: WorldwideMatchConfig, ctx: dict[str, Any]) -> pa.Table:
        return match_languages(table, ctx, cfg)

    def summarize(self, kept: pa.Table, cfg: WorldwideMatchConfig, ctx: Any) -> pa.Table | None:
        lengths = pc.list_value_length(kept.column(ENTRY_IDS_COLUMN)).fill_null(0)
        matched = pc.cast(pc.greater(lengths, 0), pa.int64())
        table = pa.table(
            {"language": kept.column(METADATA_LANGUAGE_COLUMN), "rows": pa.repeat(1, kept.num_rows)}
        )
        table = table.append_column("matched", matched)
        return (
            table.group_by("language")
            .aggregate([("rows", "sum"), ("matched", "sum")])
            .rename_columns(["language", "rows", "matched"])
        )

    def report(
        self, summaries: list[pa.Table], cfg: WorldwideMatchConfig, state: pa.Table | None
    ) -> dict[str, Any]:
        by_language = _sum_by_language(summaries, "matched")
        return {"matched": sum(by_language.values()), "matched_by_language": by_language}


register(WorldwideMatchStage())
