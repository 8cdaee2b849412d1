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

How `EntryMatcher` gets the same sets faster. Split the spaced caption on single spaces
(`spacing(text)[1:-1].split(" ")`, empty tokens included). Every space of the spaced text
separates two tokens, so `" " + entry + " "` occurs in it exactly when `entry.split(" ")`
occurs as a contiguous run of those tokens. The matcher is therefore a token trie of the
entries, walked for a whole batch at once with numpy: the batch's UTF-8 bytes are cut into
tokens without copying them (`_tokenize`), Arrow's `dictionary_encode` finds the batch's
distinct tokens, which are looked up once in the entries' vocabulary (a hash proposes, the
bytes confirm), and each further trie level is one vectorized step over the positions still
alive (a numpy open-addressing hash table maps (node, next token) to the child). Strings are
handled as UTF-8 bytes (lone surrogates as `surrogatepass` bytes), so equality of tokens is
equality of the Python strings. The result is exactly `naive_match`'s (tests compare them on
golden cases and on random captions made of the entries' tokens, punctuation and spaces;
`benchmarks/bench_matching.py` on 120k real captions x ~500k entries).

Cost: a few microseconds per caption and a fixed ~1 ms per call, so call it on batches of
thousands of captions (`match_arrow` on a Ray batch's text column); building at 500k
entries takes ~1 s and ~60 MB, and the matcher pickles as its entry list.
"""

from __future__ import annotations

import functools
import gc
import itertools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kiln import storage
from kiln.contracts import binary_buffers, require_file

__all__ = [
    "NO_SPACE_PUNCTUATION",
    "EntryMatcher",
    "NoSpaceMatcher",
    "is_no_space_char",
    "load_entries",
    "naive_match",
    "naive_match_no_space",
    "no_space_key",
    "spacing",
    "unmatchable_entries",
]

_PUNCTS_TO_WRAP = (",", ".", ";", ":", "?", "!", "`")
_CHARS_TO_SPACE = ("\t", "\n", "\r")
# captions are matched in slices of this many rows: bounds the temporary arrays
_CHUNK_ROWS = 32_768


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
    the way it reads (the caption side only has single spaces around words). Parsed once
    per version of the file in a process (the runner's check and setup both ask).
    """
    require_file(
        url,
        f"metadata entries file {url!r} does not exist: set match.entries to a text file "
        "with one entry per line",
    )
    return list(_load_entries(url, *storage.file_version(url)))


@functools.lru_cache(maxsize=4)
def _load_entries(url: str, size: Any, mtime: str) -> tuple[str, ...]:
    fs, path = storage.fs_path(url)
    with fs.open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"metadata entries file {url!r} is not UTF-8: {e}") from e
    lines = text.split("\n")
    if "\r" in text:
        lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    bad_lines = [
        n
        for n, line in enumerate(lines, start=1)
        if line
        and (line[0].isspace() or line[-1].isspace() or "\t" in line or "\r" in line)
        and not line.isspace()
    ]
    if bad_lines:
        shown = ", ".join(str(n) for n in bad_lines[:20])
        more = f" (and {len(bad_lines) - 20} more)" if len(bad_lines) > 20 else ""
        raise ValueError(
            f"metadata entries file {url!r}: lines {shown}{more} have leading/trailing "
            "whitespace or a tab, which can never match; remove it"
        )
    entries = tuple(dict.fromkeys(line for line in lines if line and not line.isspace()))
    if not entries:
        raise ValueError(f"metadata entries file {url!r} has no entries: add one per line")
    return entries


_UNICODE_SPACE = re.compile(r"\s")
# what `_why_unmatchable` can object to: tab / newline / CR, the punctuation spacing()
# isolates; with normalized captions also any non-ASCII character and a double space
_SUSPECT_RAW = re.compile(r"[\t\n\r,.;:?!`]")
_SUSPECT_NORMALIZED = re.compile(r"[\t\n\r,.;:?!`]|  |[^\x00-\x7f]")


def unmatchable_entries(entries: Sequence[str], *, normalized: bool) -> list[tuple[int, str, str]]:
    """(entry id, entry, why) for every entry that no caption can ever match.

    Always unmatchable (MetaCLIP's own `spacing()` rules): a tab / newline / CR (the caption
    side turns them into spaces), and one of ``, . ; : ? ! ` `` glued to other characters
    (the caption side always has spaces around them; "u.s." must be written "u . s .").
    With `normalized=True` (captions are NFC, every whitespace run collapsed to one ASCII
    space, stripped, as the text stage's `normalize_text` does) also: a non-ASCII space
    (NBSP, U+3000, ...), an entry that is not NFC (a decomposed accent), and a double space
    between two words (after normalization a caption only has two spaces in a row next to
    one of the punctuation marks above).
    """
    found: list[tuple[int, str, str]] = []
    suspect = _SUSPECT_NORMALIZED if normalized else _SUSPECT_RAW
    for entry_id, entry in enumerate(entries):
        if suspect.search(entry) is None:  # plain ASCII words: the common case
            continue
        why = _why_unmatchable(entry, normalized=normalized)
        if why is not None:
            found.append((entry_id, entry, why))
    return found


def _why_unmatchable(entry: str, *, normalized: bool) -> str | None:
    for char in _CHARS_TO_SPACE:
        if char in entry:
            return f"contains {char!r}, which spacing() turns into a space in every caption"
    tokens = entry.split(" ")
    for token in tokens:
        if len(token) > 1 and any(p in token for p in _PUNCTS_TO_WRAP):
            fixed = spacing(entry)[1:-1].strip(" ")
            return (
                f"token {token!r} has punctuation glued to it, but spacing() puts spaces "
                f"around , . ; : ? ! ` in every caption: write the entry as {fixed!r}"
            )
    if not normalized:
        return None
    other_space = next((c for c in entry if c != " " and _UNICODE_SPACE.match(c)), None)
    if other_space is not None:
        return (
            f"contains the space character U+{ord(other_space):04X}; normalized captions only "
            "have ASCII spaces: replace it with ' '"
        )
    if not unicodedata.is_normalized("NFC", entry):
        return (
            "is not in Unicode NFC form (e.g. a decomposed accent) while normalized captions "
            f"are: write it as {unicodedata.normalize('NFC', entry)!r}"
        )
    for i in range(1, len(tokens) - 1):
        before, after = tokens[i - 1], tokens[i + 1]
        punct_next_to_it = before in _PUNCTS_TO_WRAP or after in _PUNCTS_TO_WRAP
        if tokens[i] == "" and before and after and not punct_next_to_it:
            return (
                "has a double space between words; normalized captions have single "
                f"spaces: write it as {' '.join(t for t in tokens if t)!r}"
            )
    return None


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _to_binary(texts: Sequence[str | None]) -> pa.Array:
    """Python strings (or None) as an Arrow binary array of their UTF-8 bytes; a string with
    lone surrogates keeps them (`surrogatepass`), so byte equality is string equality."""
    try:
        return pa.array(texts, type=pa.string()).cast(pa.binary())
    except (UnicodeEncodeError, pa.ArrowException):
        return pa.array([None if t is None else _encode(t) for t in texts], type=pa.binary())


_HASH_MULT = np.uint64(0x100000001B3)
_HASH_MIX = np.uint64(0xBF58476D1CE4E5B9)


def _hash_strings(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """A 63-bit polynomial hash (as int64 >= 0) of each byte string `data[o[i]:o[i+1]]`.

    Only a hint: equal strings get equal hashes, and every use checks the bytes."""
    lengths = np.diff(offsets)
    hashes = lengths.astype(np.uint64) * _HASH_MIX
    if data.size:
        powers = np.cumprod(np.full(int(lengths.max()), _HASH_MULT, dtype=np.uint64))
        within = np.arange(data.size) - np.repeat(offsets[:-1], lengths)
        terms = data.astype(np.uint64) * powers[within]
        nonempty = np.flatnonzero(lengths)
        hashes[nonempty] += np.add.reduceat(terms, offsets[nonempty])
    hashes ^= hashes >> np.uint64(31)
    hashes *= _HASH_MIX
    hashes ^= hashes >> np.uint64(29)
    return (hashes >> np.uint64(1)).astype(np.int64)


#: `spacing()`'s wrapped punctuation as one RE2 group (for `pc.replace_substring_regex`)
_WRAP_PATTERN = "([" + re.escape("".join(_PUNCTS_TO_WRAP)) + "])"

_SEPARATOR, _PUNCT = 1, 2
_BYTE_CLASS = np.zeros(256, dtype=np.uint8)
_BYTE_CLASS[[ord(c) for c in (" ", *_CHARS_TO_SPACE)]] = _SEPARATOR
_BYTE_CLASS[[ord(c) for c in _PUNCTS_TO_WRAP]] = _PUNCT


def _tokenize(texts: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """The tokens `spacing(t)[1:-1].split(" ")` of every row, each with the separator byte
    that ends it if any (see `_strip_separator`), as one binary array over the captions' own
    bytes; each row is followed by an empty "sentinel" slot. Also the row of every slot
    (int32) and the positions of the sentinels.

    Works on the UTF-8 bytes (ASCII bytes never occur inside a multi-byte character). A
    space, tab, newline or CR ends a token (the token keeps that byte, so the tokens tile the
    bytes and no copy is made); a punctuation mark is a token of its own, with the zero-width
    separators `spacing()` puts around it. So the slots' offsets are the rows' starts and
    ends plus one boundary after each separator and one on each side of each punctuation mark.
    """
    rows = len(texts)
    offsets, data = binary_buffers(texts)
    # separators and punctuation are all < 0x40 or the backquote: classify only those bytes
    maybe = np.flatnonzero((data < 0x40) | (data == 0x60))
    byte_class = np.take(_BYTE_CLASS, data[maybe])
    special = maybe[byte_class != 0]
    is_punct = byte_class[byte_class != 0] == _PUNCT
    # boundaries: after a separator at i -> i + 1; a punctuation mark at i -> i and i + 1
    per_special = 1 + is_punct.astype(np.int64)
    boundary = np.repeat(special + 1, per_special)
    first_of = np.cumsum(per_special) - per_special
    boundary[first_of[is_punct]] -= 1
    boundaries_before = np.zeros(special.size + 1, dtype=np.int64)
    np.cumsum(per_special, out=boundaries_before[1:])
    boundaries_per_row = np.diff(boundaries_before[np.searchsorted(special, offsets)])

    # slots of row r: its boundaries + 1 tokens, then the sentinel (empty, at the row's end)
    slots_per_row = boundaries_per_row + 2
    num_slots = int(slots_per_row.sum())
    first_slot = np.cumsum(slots_per_row) - slots_per_row
    token_offsets = np.empty(num_slots + 1, dtype=np.int64)
    token_offsets[first_slot] = offsets[:-1]
    row_of_boundary = np.repeat(np.arange(rows, dtype=np.int64), boundaries_per_row)
    token_offsets[np.arange(boundary.size) + 2 * row_of_boundary + 1] = boundary
    sentinels = first_slot + boundaries_per_row + 1
    token_offsets[sentinels] = offsets[1:]
    token_offsets[num_slots] = offsets[-1]
    tokens = _binary_array(token_offsets, data)
    slot_row = np.repeat(np.arange(rows, dtype=np.int32), slots_per_row)
    return tokens, slot_row, sentinels


def _binary_array(offsets: np.ndarray, data: np.ndarray) -> pa.Array:
    """A binary array over `data` (no copy) with the given int64 offsets."""
    if data.size < 2**31:
        kind, offsets = pa.binary(), offsets.astype(np.int32)
    else:
        kind = pa.large_binary()
    return pa.Array.from_buffers(
        kind, offsets.size - 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


def _strip_separator(tokens: pa.Array) -> pa.Array:
    """`tokens` (from `_tokenize`) without the separator byte that may end each."""
    offsets, data = binary_buffers(tokens)
    ends = offsets[1:]
    nonempty = np.flatnonzero(ends > offsets[:-1])
    stripped = np.zeros(len(tokens), dtype=bool)
    stripped[nonempty] = np.take(_BYTE_CLASS, data[ends[nonempty] - 1]) == _SEPARATOR
    if not stripped.any():
        return tokens
    new_offsets = offsets.copy()
    new_offsets[1:] -= np.cumsum(stripped)
    return _binary_array(new_offsets, np.delete(data, ends[stripped] - 1))


def _sorted_groups(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order that sorts `values` stably, the sorted values, True where a new value starts)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.ones(ordered.size, dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    return order, ordered, starts


def _first_occurrences(values: np.ndarray) -> np.ndarray:
    """Index of the first occurrence of each distinct value of `values`."""
    order, _, starts = _sorted_groups(values)
    return order[starts]


def _unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, index of each value in them): `np.unique(values,
    return_inverse=True)` by one argsort (numpy 2's hash-based unique is slower here)."""
    order, ordered, starts = _sorted_groups(values)
    inverse = np.empty(values.size, dtype=np.int64)
    inverse[order] = np.cumsum(starts) - 1
    return ordered[starts], inverse


class _IntMap:
    """int64 -> int64 open-addressing hash table (linear probing, load factor <= 1/4), queried
    a whole array at a time with numpy. Keys must be distinct and >= 0."""

    _MULT = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, keys: np.ndarray, values: np.ndarray) -> None:
        bits = max(4, int(4 * len(keys)).bit_length())
        self._shift = np.uint64(64 - bits)
        self._mask = np.int64((1 << bits) - 1)
        self._keys = np.full(1 << bits, -1, dtype=np.int64)
        self._values = np.full(1 << bits, -1, dtype=np.int64)
        slots = self._slots(keys)
        pending = np.arange(len(keys))
        while pending.size:
            free = self._keys[slots] == -1
            # among the keys aiming at the same free slot, the first one takes it
            cand = np.flatnonzero(free)
            won = cand[_first_occurrences(slots[cand])]
            self._keys[slots[won]] = keys[pending[won]]
            self._values[slots[won]] = values[pending[won]]
            lost = np.ones(pending.size, dtype=bool)
            lost[won] = False
            pending, slots = pending[lost], slots[lost]
            moved = self._keys[slots] != -1  # occupied now: probe the next slot
            slots = np.where(moved, (slots + 1) & self._mask, slots)
        stored = np.flatnonzero(self._keys != -1)
        distance = (stored - self._slots(self._keys[stored])) & self._mask
        self._max_probe = int(distance.max()) if distance.size else 0

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        hashed = keys.astype(np.uint64) * self._MULT
        return (hashed >> self._shift).astype(np.int64)

    def get(self, queries: np.ndarray) -> np.ndarray:
        """Values of `queries` (int64), -1 where a query is not a key.

        One gather at the home slot answers most queries; the others look at the whole
        probe window at once (no key sits further than `_max_probe` from its home slot), so
        a lookup is two vectorized rounds whatever the clustering."""
        slots = self._slots(queries)
        stored = self._keys.take(slots)
        here = stored == queries
        result = np.where(here, self._values.take(slots), -1)
        rest = np.flatnonzero(~here & (stored != -1))
        if rest.size and self._max_probe:
            window = slots[rest, None] + np.arange(1, self._max_probe + 1)
            match = self._keys.take(window, mode="wrap") == queries[rest, None]
            found = np.flatnonzero(match.any(axis=1))
            at = window[found, match[found].argmax(axis=1)]
            result[rest[found]] = self._values.take(at, mode="wrap")
        return result


class _Vocabulary:
    """The entries' distinct tokens (UTF-8 bytes) -> token id (their position), looked up a
    whole array of tokens at a time: a hash table of 63-bit string hashes proposes an id and
    the bytes are compared to confirm it (so the answer is exact whatever the hashes do)."""

    def __init__(self, tokens: pa.Array) -> None:
        self._offsets, self._data = binary_buffers(tokens)
        self._lengths = np.diff(self._offsets)
        hashes = _hash_strings(self._offsets, self._data)
        self._exact: dict[bytes, int] | None = None
        if _first_occurrences(hashes).size < hashes.size:  # two tokens share a hash: use a dict
            self._exact = {token: i for i, token in enumerate(tokens.to_pylist())}
        self._table = _IntMap(hashes, np.arange(len(tokens), dtype=np.int64))

    def lookup(self, tokens: pa.Array) -> np.ndarray:
        """Token id of each of `tokens` (a binary array, distinct values), -1 if unknown."""
        if self._exact is not None:
            get = self._exact.get
            return np.array([get(t, -1) for t in tokens.to_pylist()], dtype=np.int64)
        offsets, data = binary_buffers(tokens)
        ids = self._table.get(_hash_strings(offsets, data))
        lengths = np.diff(offsets)
        known = np.flatnonzero(ids >= 0)
        same_length = self._lengths[ids[known]] == lengths[known]
        known = known[same_length]
        size = lengths[known]
        which = np.repeat(np.arange(known.size), size)
        within = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
        ours = data[offsets[known][which] + within]
        theirs = self._data[self._offsets[ids[known]][which] + within]
        differs = np.zeros(known.size, dtype=bool)
        differs[which[ours != theirs]] = True
        confirmed = np.full(ids.size, -1, dtype=np.int64)
        good = known[~differs]
        confirmed[good] = ids[good]
        return confirmed


class EntryMatcher:
    """Batch matcher of captions against metadata entries; same results as `naive_match`.

    Entry ids are positions in `entries`. Repeated entries are allowed (each id matches).
    `match_arrow` is the fast path (an Arrow string column in, `list<int32>` out);
    `match_many` and `match` take Python strings. Pickles as its entry list and rebuilds
    its tables on load, so Ray ships it cheaply.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries: list[str] = list(entries)
        for entry_id, entry in enumerate(self.entries):
            if not isinstance(entry, str):
                raise TypeError(f"entry {entry_id} is {entry!r}, expected a string")
        self._build()

    def _build(self) -> None:
        """Token trie of the distinct entry strings, built one level at a time with numpy."""
        encoded = pc.dictionary_encode(_to_binary(self.entries))
        key_of_entry = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        num_keys = len(encoded.dictionary)  # distinct entries, in order of first occurrence
        # entry ids grouped by key, ascending (CSR): repeated entries each keep their id
        self._key_ids = np.argsort(key_of_entry, kind="stable").astype(np.int32)
        self._key_starts = np.searchsorted(key_of_entry[self._key_ids], np.arange(num_keys + 1))
        self._key_first_id = self._key_ids[self._key_starts[:-1]]
        self._repeated = num_keys < len(self.entries)

        token_lists = pc.split_pattern(encoded.dictionary, " ")
        tokens = pc.dictionary_encode(token_lists.flatten())
        self._vocab = _Vocabulary(tokens.dictionary)
        num_tokens = self._num_tokens = len(tokens.dictionary)
        token_ids = tokens.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        lengths = pc.list_value_length(token_lists).to_numpy(zero_copy_only=False)
        starts = np.cumsum(lengths) - lengths
        self._max_len = int(lengths.max()) if num_keys else 1

        # a one-token prefix is its token id; longer prefixes get ids from num_tokens up
        node = token_ids[starts] if num_keys else np.zeros(0, np.int64)
        alive = np.arange(num_keys)
        end_node = node.copy()
        edge_keys, edge_children = [], []
        next_node = num_tokens
        for depth in range(1, self._max_len):
            longer = lengths[alive] > depth
            alive, node = alive[longer], node[longer]
            pair = node * num_tokens + token_ids[starts[alive] + depth]
            distinct, node = _unique_inverse(pair)
            node += next_node
            edge_keys.append(distinct)
            edge_children.append(np.arange(distinct.size, dtype=np.int64) + next_node)
            next_node += distinct.size
            end_node[alive] = node
        terminal = np.full(next_node, -1, dtype=np.int64)
        terminal[end_node] = np.arange(num_keys)
        has_child = np.zeros(next_node, dtype=bool)
        keys = np.concatenate(edge_keys) if edge_keys else np.zeros(0, np.int64)
        has_child[keys // max(1, num_tokens)] = True
        # one-token prefixes are looked up per batch token; an edge's value packs what the
        # walk needs of its child: (entry key + 1, has a child, node id), so no per-node
        # arrays are gathered at random during the walk
        self._terminal, self._has_child = terminal[:num_tokens], has_child[:num_tokens]
        self._node_bits = max(1, next_node.bit_length())
        children = np.concatenate(edge_children) if edge_children else np.zeros(0, np.int64)
        packed = (terminal[children] + 1) << np.int64(self._node_bits + 1)
        packed |= has_child[children].astype(np.int64) << np.int64(self._node_bits)
        packed |= children
        self._edges = _IntMap(keys, packed)
        # tokens that occur after the first token of some entry
        self._can_follow = np.zeros(max(1, num_tokens), dtype=bool)
        not_first = np.repeat(starts, lengths) != np.arange(token_ids.size)
        self._can_follow[token_ids[not_first]] = True

    def __len__(self) -> int:
        return len(self.entries)

    def __reduce__(self) -> tuple[Any, tuple[list[str]]]:
        return (EntryMatcher, (self.entries,))

    def match(self, text: str | None) -> list[int]:
        """Sorted ids of the entries that occur in `text` (reference semantics); a `None` or
        other non-string matches nothing."""
        return self.match_many([text])[0]

    def match_many(self, texts: Iterable[str | None]) -> list[list[int]]:
        """Sorted entry ids per caption; a null or non-string caption matches nothing."""
        items = [t if isinstance(t, str) else None for t in texts]
        offsets, values = self._match_chunks(_to_binary(items))
        # lists of ints cannot form reference cycles: pausing the cyclic GC while millions of
        # them are made halves the cost of building the result
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            ids = values.astype(np.int64).tolist()  # (faster than from int32)
            bounds = offsets.tolist()
            return [ids[start:end] for start, end in itertools.pairwise(bounds)]
        finally:
            if was_enabled:
                gc.enable()

    def match_arrow(self, texts: pa.Array | pa.ChunkedArray) -> pa.ListArray:
        """`list<int32>` of sorted entry ids, one list per input row (never null): the fast
        path for Arrow batches. Null rows, and every row of a non-string column, get `[]`."""
        if isinstance(texts, pa.ChunkedArray):
            chunks = [self.match_arrow(chunk) for chunk in texts.chunks]
            if not chunks:
                return pa.array([], type=pa.list_(pa.int32()))
            return pa.concat_arrays(chunks)
        kind = texts.type
        if pa.types.is_string_view(kind):
            texts = texts.cast(pa.string())
        elif not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            offsets = np.zeros(len(texts) + 1, dtype=np.int32)
            return pa.ListArray.from_arrays(offsets, pa.array([], type=pa.int32()))
        offsets, values = self._match_chunks(texts)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    def _match_chunks(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(offsets int32, ids int32) of the matches of every row, in `_CHUNK_ROWS` slices."""
        all_offsets = [np.zeros(1, dtype=np.int64)]
        all_values = []
        done = 0
        for start in range(0, len(texts), _CHUNK_ROWS):
            counts, values = self._match_array(texts.slice(start, _CHUNK_ROWS))
            all_offsets.append(np.cumsum(counts) + done)
            all_values.append(values)
            done += values.size
        offsets = np.concatenate(all_offsets)
        if offsets[-1] >= 2**31:  # list<int32> offsets are int32
            raise ValueError(
                f"{len(texts)} captions gave {offsets[-1]} matches, more than one list<int32> "
                "array holds: match fewer captions per call"
            )
        offsets = offsets.astype(np.int32)
        values = np.concatenate(all_values) if all_values else np.zeros(0, dtype=np.int32)
        return offsets, values.astype(np.int32, copy=False)

    def _match_array(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(matches per row, their ids) for one slice of string / binary captions."""
        rows = len(texts)
        tokens, slot_row, sentinels = _tokenize(texts)
        if not self._key_first_id.size or rows == 0:
            return np.zeros(rows, dtype=np.int64), np.zeros(0, dtype=np.int32)
        encoded = pc.dictionary_encode(tokens)
        # per distinct token of the batch (plus one last value for the sentinels): its token
        # id, the entry it ends (a one-token entry), whether an entry goes on after it, and
        # whether it occurs after the first token of some entry; gathered per slot from these
        # small arrays rather than from the large per-node ones
        distinct = np.append(self._vocab.lookup(_strip_separator(encoded.dictionary)), -1)
        known = distinct >= 0
        ends_key = np.where(known, self._terminal[distinct], -1)
        goes_on = known & self._has_child[distinct]
        follows = known & self._can_follow[distinct]
        slot = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32)
        slot[sentinels] = distinct.size - 1  # no n-gram runs across a row's end

        # one-token entries; then the trie, one token further per round, from the positions
        # whose n-gram so far is a proper prefix of some entry
        key = ends_key[slot]
        pos = np.flatnonzero(key >= 0)
        found_pos: list[np.ndarray] = [pos]
        found_keys: list[np.ndarray] = [key[pos]]
        pos = np.flatnonzero(goes_on[slot[:-1]] & follows[slot[1:]])
        node = distinct[slot[pos]]
        node_bits_1 = np.int64(self._node_bits + 1)
        child_bit = np.int64(1 << self._node_bits)
        node_mask = np.int64((1 << self._node_bits) - 1)
        size = 1
        while pos.size and size < self._max_len:
            next_slot = slot[pos + size]  # in range: the row's sentinel comes first
            if size > 1:  # (the first round was filtered above)
                go_on = follows[next_slot]
                pos, node, next_slot = pos[go_on], node[go_on], next_slot[go_on]
            packed = self._edges.get(node * self._num_tokens + distinct[next_slot])
            go_on = packed >= 0
            pos, packed = pos[go_on], packed[go_on]
            size += 1
            keys = (packed >> node_bits_1) - 1
            hit = keys >= 0
            found_pos.append(pos[hit])
            found_keys.append(keys[hit])
            go_on = (packed & child_bit) != 0
            pos, node = pos[go_on], packed[go_on] & node_mask

        num_keys = self._key_first_id.size
        hit_row = slot_row[np.concatenate(found_pos)].astype(np.int64)
        if texts.null_count:  # a null row has no caption, whatever bytes back it
            valid = texts.is_valid().to_numpy(zero_copy_only=False)
            hit_row_ok = valid[hit_row]
            hit_row = hit_row[hit_row_ok]
            hit_keys_all = np.concatenate(found_keys)[hit_row_ok]
        else:
            hit_keys_all = np.concatenate(found_keys)
        pairs = np.sort(hit_row * num_keys + hit_keys_all)
        if pairs.size > 1:  # an entry found twice in a caption counts once
            pairs = pairs[np.concatenate(([True], pairs[1:] != pairs[:-1]))]
        hit_rows = pairs // num_keys
        hit_keys = pairs - hit_rows * num_keys
        if not self._repeated:
            return np.bincount(hit_rows, minlength=rows), self._key_first_id[hit_keys]
        return self._expand_repeated(hit_rows, hit_keys, rows)

    def _expand_repeated(
        self, hit_rows: np.ndarray, hit_keys: np.ndarray, rows: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every id of each matched entry string (repeated entries), sorted per row."""
        per_key = np.diff(self._key_starts)[hit_keys]
        row = np.repeat(hit_rows, per_key)
        within = np.arange(int(per_key.sum())) - np.repeat(np.cumsum(per_key) - per_key, per_key)
        ids = self._key_ids[np.repeat(self._key_starts[hit_keys], per_key) + within]
        order = np.lexsort((ids, row))
        return np.bincount(row, minlength=rows), ids[order]


# --------------------------------------------------------------------------- MetaCLIP 2

#: Punctuation that, at an entry's edge, drops the space padding on that side (MetaCLIP 2's
#: `is_punctuation`: ASCII `string.punctuation` plus common CJK / full-width marks).
NO_SPACE_PUNCTUATION = frozenset(
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" + "，。、；：？！“”‘’（）【】《》〈〉「」『』～—"
)
_NO_SPACE_RANGES = (
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0x3400, 0x4DBF),  # extension A
    (0x20000, 0x2A6DF),  # extensions B..F
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0x2CEB0, 0x2EBEF),
    (0xF900, 0xFAFF),  # compatibility ideographs
    (0x2E80, 0x2EFF),  # radicals supplement
    (0x2F00, 0x2FDF),  # Kangxi radicals
    (0x2FF0, 0x2FFF),  # ideographic description characters
    (0x0E00, 0x0E7F),  # Thai
    (0x0E80, 0x0EFF),  # Lao
    (0x1000, 0x109F),  # Burmese
    (0x1780, 0x17FF),  # Khmer
    (0x0F00, 0x0FFF),  # Tibetan
)


def is_no_space_char(char: str) -> bool:
    """True for a character that MetaCLIP 2 does not pad with a space when it ends an entry:
    CJK ideographs, Thai, Lao, Burmese, Khmer, Tibetan, and punctuation
    (`NO_SPACE_PUNCTUATION`). The ranges are the reference's `is_cjk_or_similar`: e.g.
    Japanese kana and Hangul are not in them, so kana-final entries keep their padding."""
    code = ord(char)
    return char in NO_SPACE_PUNCTUATION or any(lo <= code <= hi for lo, hi in _NO_SPACE_RANGES)


def no_space_key(entry: str) -> str:
    """The string MetaCLIP 2 looks for in `spacing(caption)`: the entry with a space before it
    unless its first character `is_no_space_char`, and after it unless its last one is. (The
    empty entry is padded on both sides, as MetaCLIP 1 pads every entry.)"""
    if not entry:
        return "  "
    before = "" if is_no_space_char(entry[0]) else " "
    after = "" if is_no_space_char(entry[-1]) else " "
    return f"{before}{entry}{after}"


def naive_match_no_space(text: str, entries: Sequence[str]) -> list[int]:
    """MetaCLIP 2's reference matching: ids of the entries whose `no_space_key` occurs in
    `spacing(text)`, ascending. The ground truth for `NoSpaceMatcher`."""
    spaced = spacing(text)
    return [i for i, entry in enumerate(entries) if no_space_key(entry) in spaced]


class NoSpaceMatcher:
    """Batch matcher with MetaCLIP 2's no-space rule; same results as `naive_match_no_space`.

    An entry padded on both sides (every plain-word entry) is matched exactly as MetaCLIP 1
    matches it, so those go to an `EntryMatcher` (the token trie). The others (a CJK, Thai,
    ... or punctuation character at an edge) are substrings that may start or end inside a
    token: they go to an Aho-Corasick automaton over their keys, run over each caption's
    `spacing()` (pyahocorasick's `iter` reports every occurrence, overlapping ones too). The
    two id sets are merged per caption, sorted. Pickles as its entry list.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        import ahocorasick

        self.entries: list[str] = list(entries)
        padded: list[int] = []
        keys: dict[str, list[int]] = {}
        for entry_id, entry in enumerate(self.entries):
            if not isinstance(entry, str):
                raise TypeError(f"entry {entry_id} is {entry!r}, expected a string")
            key = no_space_key(entry)
            if key.startswith(" ") and key.endswith(" "):
                padded.append(entry_id)
            else:
                keys.setdefault(key, []).append(entry_id)
        self._padded_ids = np.asarray(padded, dtype=np.int32)
        self._trie = EntryMatcher(self.entries[i] for i in padded)
        self._automaton: Any = None
        # length (in characters) of each entry's key, to find where a hit starts
        self._key_length = np.asarray(
            [len(no_space_key(entry)) for entry in self.entries], dtype=np.int64
        )
        if keys:
            self._automaton = ahocorasick.Automaton()
            for key, ids in keys.items():
                self._automaton.add_word(key, tuple(ids))
            self._automaton.make_automaton()

    def __len__(self) -> int:
        return len(self.entries)

    def __reduce__(self) -> tuple[Any, tuple[list[str]]]:
        return (NoSpaceMatcher, (self.entries,))

    def match(self, text: str | None) -> list[int]:
        """Sorted ids of the entries that occur in `text`; a non-string matches nothing."""
        return self.match_many([text])[0]

    def match_many(self, texts: Iterable[str | None]) -> list[list[int]]:
        """Sorted entry ids per caption; a null or non-string caption matches nothing."""
        items = [t if isinstance(t, str) else None for t in texts]
        padded = self._padded_ids.tolist()
        rows = [[padded[i] for i in ids] for ids in self._trie.match_many(items)]
        if self._automaton is not None:
            for row, text in zip(rows, items, strict=True):
                extra = self._substring_ids(text)
                if extra:
                    row[:] = sorted(set(row) | extra)
        return rows

    def _substring_ids(self, text: str | None) -> set[int]:
        """Ids of the one-side-unpadded entries whose key occurs in `spacing(text)`."""
        if text is None or self._automaton is None:
            return set()
        return {e for _end, ids in self._automaton.iter(spacing(text)) for e in ids}

    def match_arrow(self, texts: pa.Array | pa.ChunkedArray) -> pa.ListArray:
        """`list<int32>` of sorted entry ids per row (never null), as `EntryMatcher`."""
        if isinstance(texts, pa.ChunkedArray):
            texts = texts.combine_chunks() if texts.num_chunks else pa.array([], type=pa.string())
        if pa.types.is_string_view(texts.type):
            texts = texts.cast(pa.string())
        trie = self._trie.match_arrow(texts)
        offsets = trie.offsets.to_numpy().astype(np.int64)
        values = self._padded_ids[pc.list_flatten(trie).to_numpy(zero_copy_only=False)]
        rows = len(texts)
        if self._automaton is None or not (
            pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)
        ):
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
        hit_rows, hit_ids = self._substring_hits(texts)
        trie_rows = np.repeat(np.arange(rows, dtype=np.int64), np.diff(offsets))
        size = np.int64(max(1, len(self.entries)))
        pairs = np.sort(np.concatenate([trie_rows * size + values, hit_rows * size + hit_ids]))
        if pairs.size > 1:  # an entry found by both, or twice, counts once
            pairs = pairs[np.concatenate(([True], pairs[1:] != pairs[:-1]))]
        counts = np.bincount(pairs // size, minlength=rows)
        new_offsets = np.zeros(rows + 1, dtype=np.int32)
        np.cumsum(counts, out=new_offsets[1:])
        return pa.ListArray.from_arrays(
            pa.array(new_offsets), pa.array((pairs % size).astype(np.int32))
        )

    def _substring_hits(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(row, entry id) of every automaton key found in a row's `spacing()`, for a whole
        string array at once: the spaced captions are laid end to end in one string (each
        begins and ends with a space) and searched in one pass; a hit that straddles two
        rows is discarded, so each row sees exactly its own text."""
        spaced = pc.replace_substring_regex(pc.fill_null(texts, ""), _WRAP_PATTERN, r" \1 ")
        spaced = pc.replace_substring_regex(spaced, "[\t\n\r]", " ")
        spaced = pc.binary_join_element_wise(" ", spaced, " ", "")  # spacing(), vectorized
        starts = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(pc.utf8_length(spaced).to_numpy(zero_copy_only=False), out=starts[1:])
        found_ends: list[int] = []
        found_ids: list[tuple[int, ...]] = []
        key_length = self._key_length
        joined = "".join(spaced.to_pylist())
        for end, ids in self._automaton.iter(joined):
            found_ends.append(end)
            found_ids.append(ids)
        if not found_ends:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ends = np.asarray(found_ends, dtype=np.int64)
        first_ids = np.asarray([ids[0] for ids in found_ids], dtype=np.int64)
        begin = ends - key_length[first_ids] + 1
        row = np.searchsorted(starts, ends, side="right") - 1
        inside = np.searchsorted(starts, begin, side="right") - 1 == row
        per_hit = np.asarray([len(ids) for ids in found_ids], dtype=np.int64)
        flat = np.fromiter(
            (e for ids in found_ids for e in ids), dtype=np.int64, count=int(per_hit.sum())
        )
        keep = np.repeat(inside, per_hit)
        return np.repeat(row, per_hit)[keep], flat[keep]
