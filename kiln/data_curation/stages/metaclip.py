"""MetaCLIP curation: substring matching of captions against metadata entries, then balancing.

Matching follows the reference implementation (facebookresearch/MetaCLIP,
`metaclip/substr_matching.py`) exactly: the caption is padded with one space at each end,
each of ``, . ; : ? ! ` `` gets a space on both sides, tab / newline / CR become spaces, and
an entry matches when `" " + entry + " "` occurs in that text. Matching is case-sensitive,
overlapping entries all match ("red" and "red circle"), and an entry counts at most once per
caption. So "a dog." matches `dog`, while "DOG", "dog's", "(dog)" and "dogs" do not; "3.5
stars" matches `3`.

The reference loops over all entries per caption (O(entries) substring searches).
`EntryMatcher` gets the same sets from one Aho-Corasick pass over the spaced caption
(pyahocorasick), whose cost grows with the caption length and the number of hits instead.

Balancing: with `count[e]` the number of (alive) captions matching entry `e` over the whole
pool, each entry keeps a caption with probability `p[e] = min(1, t / count[e])`, and a
caption is kept when any of its entries keeps it (one Bernoulli trial per matched entry),
i.e. with probability `1 - prod(1 - p[e])`. Each trial's uniform draw is a pure function of
(seed, uid, entry id), so the result does not depend on workers, block sizes or retries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import ahocorasick
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kiln.contracts import require_file
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

_PUNCTS_TO_WRAP = (",", ".", ";", ":", "?", "!", "`")
_CHARS_TO_SPACE = ("\t", "\n", "\r")


def spacing(text: str) -> str:
    """The caption as the reference matcher sees it (MetaCLIP's `spacing()`, same steps)."""
    spaced = f" {text} "
    for punct in _PUNCTS_TO_WRAP:
        spaced = spaced.replace(punct, f" {punct} ")
    for char in _CHARS_TO_SPACE:
        spaced = spaced.replace(char, " ")
    return spaced


def naive_match(text: str, entries: Sequence[str]) -> list[int]:
    """Reference matching: ids of the entries `e` with `" e "` in `spacing(text)`, ascending.

    O(len(entries)) substring searches per caption; used by tests and the benchmark as the
    ground truth for `EntryMatcher`.
    """
    spaced = spacing(text)
    return [i for i, entry in enumerate(entries) if f" {entry} " in spaced]


def load_entries(url: str) -> list[str]:
    """Metadata entries from a text file (any fsspec URL), one per line, in file order.

    Rules: only the line ending is removed (an entry is matched exactly as written); blank
    lines are skipped; a repeated entry keeps its first position (later copies are ignored,
    so entry ids are the positions of first occurrences). An entry with leading or trailing
    whitespace, or a tab, is an error naming the file and lines, because it can never match
    the way it reads (the caption side only has single spaces around words).
    """
    fs, path = require_file(
        url,
        f"metadata entries file {url!r} does not exist: set match.entries to a text file "
        "with one entry per line",
    )
    with fs.open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"metadata entries file {url!r} is not UTF-8: {e}") from e
    entries: list[str] = []
    seen: set[str] = set()
    bad_lines: list[int] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        entry = line[:-1] if line.endswith("\r") else line
        if not entry.strip():
            continue
        if entry != entry.strip() or "\t" in entry or "\r" in entry:
            bad_lines.append(lineno)
            continue
        if entry not in seen:
            seen.add(entry)
            entries.append(entry)
    if bad_lines:
        shown = ", ".join(str(n) for n in bad_lines[:20])
        more = f" (and {len(bad_lines) - 20} more)" if len(bad_lines) > 20 else ""
        raise ValueError(
            f"metadata entries file {url!r}: lines {shown}{more} have leading/trailing "
            "whitespace or a tab, which can never match; remove it"
        )
    if not entries:
        raise ValueError(f"metadata entries file {url!r} has no entries: add one per line")
    return entries


class EntryMatcher:
    """Aho-Corasick automaton over the keys `" " + entry + " "`; same results as `naive_match`.

    Entry ids are positions in `entries`. Repeated entries are allowed (each id matches).
    Pickles as its entry list and rebuilds the automaton on load, so Ray can ship it to
    workers whatever pyahocorasick's own pickle format does.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries: list[str] = list(entries)
        ids_by_key: dict[str, list[int]] = {}
        for entry_id, entry in enumerate(self.entries):
            if not isinstance(entry, str):
                raise TypeError(f"entry {entry_id} is {entry!r}, expected a string")
            ids_by_key.setdefault(f" {entry} ", []).append(entry_id)
        self._automaton = ahocorasick.Automaton()
        for key, ids in ids_by_key.items():
            self._automaton.add_word(key, tuple(ids))
        if ids_by_key:
            self._automaton.make_automaton()
        self._empty = not ids_by_key

    def __len__(self) -> int:
        return len(self.entries)

    def __reduce__(self) -> tuple[Any, tuple[list[str]]]:
        return (EntryMatcher, (self.entries,))

    def match(self, text: str) -> list[int]:
        """Sorted unique ids of the entries that occur in `text` (reference semantics)."""
        if self._empty:
            return []
        found: set[int] = set()
        for _end, ids in self._automaton.iter(spacing(text)):
            found.update(ids)
        return sorted(found)

    def match_many(self, texts: Iterable[str | None]) -> list[list[int]]:
        """`match` over many captions; a null caption matches nothing."""
        return [self.match(t) if isinstance(t, str) else [] for t in texts]


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
