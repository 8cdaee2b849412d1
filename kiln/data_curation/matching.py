"""MetaCLIP substring matching: captions x metadata entries -> matched entry ids.

Matching follows the reference implementation (facebookresearch/MetaCLIP,
`metaclip/substr_matching.py`) exactly: the caption is padded with one space at each end,
each of ``, . ; : ? ! ` `` gets a space on both sides, tab / newline / CR become spaces, and
an entry matches when `" " + entry + " "` occurs in that text. Matching is case-sensitive,
overlapping entries all match ("red" and "red circle"), and an entry counts at most once per
caption. So "a dog." matches `dog`, while "DOG", "dog's", "(dog)" and "dogs" do not; "3.5
stars" matches `3`.

The reference loops over all entries per caption (O(entries) substring searches);
`naive_match` is that loop, kept as the ground truth for tests and benchmarks.
`EntryMatcher(entries).match_many(texts)` is the public batch entry point.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import ahocorasick

from kiln.contracts import require_file

__all__ = ["EntryMatcher", "load_entries", "naive_match", "spacing"]

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
