"""MetaCLIP curation: substring matching of captions against metadata entries, then balancing.

Matching (`kiln.data_curation.matching`) follows MetaCLIP's reference semantics exactly.

Balancing: with `count[e]` the number of (alive) captions matching entry `e` over the whole
pool, each entry keeps a caption with probability `p[e] = min(1, t / count[e])`, and a
caption is kept when any of its entries keeps it (one Bernoulli trial per matched entry),
i.e. with probability `1 - prod(1 - p[e])`. Each trial's uniform draw is a pure function of
(seed, uid, entry id), so the result does not depend on workers, block sizes or retries.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kiln.data_curation.matching import EntryMatcher, load_entries, naive_match, spacing
from kiln.data_curation.stages import alive_mask, mark_dropped, replace_column

__all__ = [
    "ENTRY_IDS_COLUMN",
    "KEEP_PROB_COLUMN",
    "EntryMatcher",
    "balance_table",
    "count_entries",
    "keep_probabilities",
    "load_entries",
    "match_table",
    "naive_match",
    "spacing",
    "uniform_draw",
]

ENTRY_IDS_COLUMN = "entry_ids"
KEEP_PROB_COLUMN = "keep_prob"


def match_table(table: pa.Table, matcher: EntryMatcher) -> pa.Table:
    """Add `entry_ids: list<int32>`: matched entry ids per alive row, empty for dropped rows."""
    if "text" not in table.column_names:
        raise ValueError(
            f"table has no 'text' column (columns: {table.column_names}): map the caption "
            "column with input.text_column"
        )
    alive = alive_mask(table)
    texts = table.column("text").to_pylist()
    ids = [
        matcher.match(t) if a and isinstance(t, str) else []
        for t, a in zip(texts, alive, strict=True)
    ]
    return replace_column(table, ENTRY_IDS_COLUMN, pa.array(ids, type=pa.list_(pa.int32())))


def _entry_ids(table: pa.Table) -> pa.ListArray:
    if ENTRY_IDS_COLUMN not in table.column_names:
        raise ValueError(
            f"table has no {ENTRY_IDS_COLUMN!r} column: run match_table before counting "
            "or balancing"
        )
    column = table.column(ENTRY_IDS_COLUMN).combine_chunks()
    if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
        raise ValueError(f"column {ENTRY_IDS_COLUMN!r} has type {column.type}, expected list")
    return column


def count_entries(table: pa.Table, num_entries: int) -> np.ndarray:
    """Per entry, the number of alive rows whose `entry_ids` contain it (int64, length N).

    A partial count: the runner sums these vectors over blocks to get the global counts.
    """
    column = _entry_ids(table)
    alive = pa.array(alive_mask(table), type=pa.bool_())
    flat = pc.list_flatten(column.filter(alive)).to_numpy(zero_copy_only=False)
    flat = flat.astype(np.int64, copy=False)
    if flat.size and (flat.min() < 0 or flat.max() >= num_entries):
        raise ValueError(
            f"entry id out of range [0, {num_entries}): num_entries must be the length of "
            "the entry list the table was matched with"
        )
    return np.bincount(flat, minlength=num_entries).astype(np.int64)


def keep_probabilities(counts: np.ndarray, t: int) -> np.ndarray:
    """Per-entry keep probability `min(1, t / count)` (1 for an entry with count 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.ones_like(counts)
    positive = counts > 0
    probs[positive] = np.minimum(1.0, t / counts[positive])
    return probs


def uniform_draw(seed: int, uid: str, entry_id: int) -> float:
    """Uniform [0, 1) value that is a pure function of (seed, uid, entry id).

    First 8 bytes of blake2b("{seed}:{uid}:{entry_id}") as a big-endian integer / 2**64.
    """
    digest = hashlib.blake2b(f"{seed}:{uid}:{entry_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def balance_table(table: pa.Table, counts: np.ndarray, t: int, seed: int) -> pa.Table:
    """MetaCLIP balancing with global `counts`; adds `keep_prob: float64`.

    Alive rows without entries -> `no_metadata_match`; rows whose trials all fail ->
    `not_sampled`. `keep_prob` is `1 - prod(1 - p[e])` over the row's entries (0.0 for rows
    without entries, including rows dropped before matching).
    """
    if "uid" not in table.column_names:
        raise ValueError("table has no 'uid' column: balancing draws are keyed by uid")
    column = _entry_ids(table)
    probs = keep_probabilities(counts, t)
    alive = alive_mask(table)
    uids = table.column("uid").to_pylist()
    n = table.num_rows
    keep_prob = np.zeros(n, dtype=np.float64)
    no_match = np.zeros(n, dtype=bool)
    not_sampled = np.zeros(n, dtype=bool)
    for i, ids in enumerate(column.to_pylist()):
        ids = ids or []
        if ids:
            if max(ids) >= probs.shape[0] or min(ids) < 0:
                raise ValueError(
                    f"row {i} has entry id outside [0, {probs.shape[0]}): counts must come "
                    "from the same entry list as entry_ids"
                )
            keep_prob[i] = 1.0 - float(np.prod(1.0 - probs[ids]))
        if not alive[i]:
            continue
        if not ids:
            no_match[i] = True
            continue
        uid = uids[i]
        if not isinstance(uid, str):
            raise ValueError(f"row {i} has uid {uid!r}: every row needs a string uid")
        if not any(uniform_draw(seed, uid, e) < probs[e] for e in ids):
            not_sampled[i] = True
    table = replace_column(table, KEEP_PROB_COLUMN, pa.array(keep_prob, type=pa.float64()))
    table = mark_dropped(table, no_match, "no_metadata_match")
    return mark_dropped(table, not_sampled, "not_sampled")
