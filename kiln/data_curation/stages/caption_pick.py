"""Caption pick (MetaCLIP 2): one text per image, drawn with a seed, before balancing.

A record may carry several texts (`input.text_columns: [alt, title]` gives one row per text,
all with the record's `source` and `source_row`), and an image may be listed with several
captions (Flickr8k: five rows per photo). MetaCLIP 1 tests each text as its own image-text
pair: leave this stage out. MetaCLIP 2 picks one of the image's texts that matched the
metadata, uniformly at random, and balances only that one: put `caption_pick` between the
matching and the balancing stage.

Keyed stage: the key is the record (`by: record`, source + source_row) or the image
(`by: url`); rows without a match have no key (balancing drops them as
`no_metadata_match`). In each group the row with the smallest seeded draw
`uniform_draw(seed, uid, "caption_pick")` (kiln's one seeded hash, `metaclip_balance`) is
kept, the others are dropped as `caption_not_picked`: a pure function of (seed, uids), so
the pick does not depend on workers, blocks or the order of the rows.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from kiln.contracts import StrictModel
from kiln.data_curation.stage import KeyedStage, register
from kiln.data_curation.stages import alive_mask, mark_dropped
from kiln.data_curation.stages.metaclip_balance import entry_hashes, uid_hashes, uniform_draws
from kiln.data_curation.stages.metaclip_match import ENTRY_IDS_COLUMN

__all__ = ["PICK_SALT", "CaptionPickConfig", "CaptionPickStage", "picked_mask"]

#: The "entry" string the pick's draws are keyed with (next to seed and uid).
PICK_SALT = "caption_pick"


class CaptionPickConfig(StrictModel):
    """MetaCLIP 2's one-text-per-image draw."""

    seed: int = Field(default=0, description="seed of the draw that picks the text kept")
    by: Literal["record", "url"] = Field(
        default="record",
        description="what one image is: an input record (its texts from input.text_columns) "
        "or every row with the same url (an image listed with several captions)",
    )


def picked_mask(uids: pa.Array, keys: pa.Array, seed: int) -> np.ndarray:
    """True for the row kept in each run of equal `keys` (sorted; null keys are kept):
    the one with the smallest draw of (seed, uid, PICK_SALT), the first on a tie."""
    n = len(keys)
    keep = np.ones(n, dtype=bool)
    if n == 0:
        return keep
    valid = np.asarray(keys.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    draws = uniform_draws(uid_hashes(uids, seed), entry_hashes([PICK_SALT])[0])
    starts = np.ones(n, dtype=bool)
    if n > 1:
        same = pc.equal(keys.slice(1), keys.slice(0, n - 1)).fill_null(False)
        starts[1:] = ~same.to_numpy(zero_copy_only=False)
    group = np.cumsum(starts) - 1
    # rows ordered by (group, draw, position): the first of each group wins
    order = np.lexsort((np.arange(n), draws, group))
    first = np.ones(n, dtype=bool)
    first[1:] = group[order][1:] != group[order][:-1]
    keep[:] = False
    keep[order[first]] = True
    return keep | ~valid


class CaptionPickStage(KeyedStage[CaptionPickConfig]):
    """Keep one matched text per image (seeded), as MetaCLIP 2 does before balancing."""

    name = "caption_pick"
    config = CaptionPickConfig
    summary = "MetaCLIP 2: keep one matched text per image with a seeded draw"
    needs = (ENTRY_IDS_COLUMN,)
    drop_reasons: ClassVar[dict[str, str]] = {
        "caption_not_picked": "another text of the same image was picked (MetaCLIP 2)"
    }

    def key(self, table: pa.Table, cfg: CaptionPickConfig, ctx: Any) -> pa.Array:
        if cfg.by == "url":
            keys = table.column("url").combine_chunks().cast(pa.string())
        else:
            rows = table.column("source_row").combine_chunks().cast(pa.string())
            source = table.column("source").combine_chunks().cast(pa.string())
            keys = pc.binary_join_element_wise(source, rows, "\x00")
        lengths = pc.list_value_length(table.column(ENTRY_IDS_COLUMN).combine_chunks())
        candidate = alive_mask(table) & np.asarray(
            pc.fill_null(pc.greater(lengths, 0), False).to_numpy(zero_copy_only=False)
        )
        return pc.if_else(pa.array(candidate), keys, pa.scalar(None, pa.string()))

    def apply_groups(
        self, table: pa.Table, keys: pa.Array, cfg: CaptionPickConfig, ctx: Any
    ) -> pa.Table:
        keep = picked_mask(table.column("uid").combine_chunks(), keys, cfg.seed)
        return mark_dropped(table, ~keep, "caption_not_picked")


register(CaptionPickStage())
