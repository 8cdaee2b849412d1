"""EntryMatcher == MetaCLIP's reference loop (`naive_match`), on golden cases and on random
captions built from the entries' own tokens, punctuation and whitespace; Arrow entry point;
pickling; `unmatchable_entries`."""

from __future__ import annotations

import pickle
import random
import unicodedata

import pyarrow as pa
import pytest

from kiln.data_curation.matching import (
    EntryMatcher,
    naive_match,
    unmatchable_entries,
)

GOLDEN = [
    ("a dog.", "dog", True),
    ("DOG", "dog", False),
    ("dog's bowl", "dog", False),
    ("(dog)", "dog", False),
    ("hotdog", "dog", False),
    ("3.5 stars", "3", True),
    ("3.5 stars", "5", True),
    ("dog,cat", "cat", True),
    ("a\tdog\nrunning", "dog running", True),
    ("a dog\r\nrunning", "dog running", False),  # CRLF becomes two spaces
    ("a dog\r\nrunning", "dog  running", True),  # ... which a double-spaced entry matches
    ("red  circle", "red circle", False),
    ("red  circle", "red  circle", True),
    ("St. Louis", "St. Louis", False),  # glued punctuation in an entry never matches
    ("St. Louis", "St . Louis", False),
    ("St. Louis", "St .  Louis", True),  # what unmatchable_entries suggests
    ("the u.s. army", "u.s.", False),
    ("the u.s. army", "u . s .", True),
    ("a, b", ",", True),
    ("a, b", "a ,  b", True),  # spacing() leaves two spaces after the comma
    ("x", "", False),
    ("x  y", "", True),  # the empty entry is the key "  "
    ("", "", True),  # spacing("") is two spaces
    (" dog", " dog", True),  # leading space in caption and entry
    ("dog", " dog", False),
    ("café au lait", "café", True),
    ("cafe\u0301", "café", False),  # decomposed accent: different code points
    ("北京 天安门", "北京", True),
    ("北京天安门", "北京", False),
]


@pytest.mark.parametrize(("text", "entry", "expected"), GOLDEN)
def test_golden_cases_agree_with_reference(text: str, entry: str, expected: bool) -> None:
    assert (naive_match(text, [entry]) == [0]) is expected
    matcher = EntryMatcher([entry])
    assert matcher.match(text) == naive_match(text, [entry])
    assert matcher.match_arrow(pa.array([text])).to_pylist() == [naive_match(text, [entry])]


def test_overlapping_and_repeated_entries() -> None:
    entries = ["red", "red circle", "circle", "blue", "a red", "red", "big red circle"]
    matcher = EntryMatcher(entries)
    assert matcher.match("a red circle and a red circle") == [0, 1, 2, 4, 5]
    assert matcher.match("a big red circle") == [0, 1, 2, 5, 6]
    assert matcher.match("red red red") == [0, 5]
    assert matcher.match_many(["blue", None, "circle.", 3]) == [[3], [], [2], []]  # type: ignore[list-item]


def test_none_and_non_strings_match_nothing() -> None:
    matcher = EntryMatcher(["None", "1", ""])
    assert matcher.match(None) == []
    assert matcher.match(1) == []  # type: ignore[arg-type]
    assert matcher.match("None") == [1 - 1]
    assert matcher.match_arrow(pa.array([None, "None"], pa.string())).to_pylist() == [[], [0]]
    ints = matcher.match_arrow(pa.array([1, None]))
    assert ints.type == pa.list_(pa.int32()) and ints.to_pylist() == [[], []]


def test_empty_entry_list_and_empty_input() -> None:
    assert EntryMatcher([]).match("a dog") == []
    assert EntryMatcher(["dog"]).match_many([]) == []
    assert EntryMatcher(["dog"]).match_arrow(pa.array([], pa.string())).to_pylist() == []
    assert EntryMatcher(["dog"]).match_arrow(pa.chunked_array([], pa.string())).to_pylist() == []


def test_lone_surrogates_are_matched_like_python_strings() -> None:
    entries = ["a\ud800b", "a", "\udfff"]
    texts = ["x a\ud800b y", "a\ud800", "\udfff .", "a"]
    got = EntryMatcher(entries).match_many(texts)
    assert got == [naive_match(t, entries) for t in texts]
    assert got[0] == [0] and got[2] == [2]


def test_non_string_entry_is_refused() -> None:
    with pytest.raises(TypeError, match="entry 1"):
        EntryMatcher(["dog", 3])  # type: ignore[list-item]


def test_pickles_as_its_entries_and_rebuilds() -> None:
    entries = [f"word{i} thing{i % 7}" for i in range(2000)] + ["dog"]
    matcher = EntryMatcher(entries)
    blob = pickle.dumps(matcher)
    assert len(blob) < 2 * len(pickle.dumps(entries))
    again = pickle.loads(blob)
    assert again.entries == entries
    assert again.match("a dog and word5 thing5 .") == [5, 2000]


_PIECES = [",", ".", ";", ":", "?", "!", "`", " ", "  ", "\t", "\n", "\r", "'", "(", "é", "\u00a0"]


def _entries_for(rng: random.Random) -> list[str]:
    words = ["red", "circle", "Red", "a", "big", "u", "s", "3", "5", "blue sky", "é", "x'y"]
    entries = list(words)
    for _ in range(rng.randint(5, 25)):
        tokens = [rng.choice([*words, ",", ".", "", "!"]) for _ in range(rng.randint(1, 4))]
        entries.append(
            rng.choice([" ", "  ", "."]).join(tokens) if rng.random() < 0.2 else " ".join(tokens)
        )
    entries += ["u.s.", "u . s .", "", " red", "red ", "red  circle", "a ,  b", "red"]
    rng.shuffle(entries)
    return entries


def _caption_for(rng: random.Random, entries: list[str]) -> str:
    parts: list[str] = []
    for _ in range(rng.randint(0, 10)):
        if rng.random() < 0.5:
            parts.append(rng.choice(entries))
        else:
            parts.append(rng.choice(_PIECES))
    return "".join(rng.choice(["", " ", " ", ",", "."]) + p for p in parts)


@pytest.mark.parametrize("seed", range(12))
def test_random_captions_equal_reference(seed: int) -> None:
    rng = random.Random(seed)
    entries = _entries_for(rng)
    texts: list[str | None] = [_caption_for(rng, entries) for _ in range(400)]
    texts[::37] = [None] * len(texts[::37])
    expected = [[] if t is None else naive_match(t, entries) for t in texts]
    assert sum(map(len, expected)) > 400  # the captions do exercise the entries
    matcher = EntryMatcher(entries)
    assert matcher.match_many(texts) == expected
    array = pa.array(texts, pa.string())
    assert matcher.match_arrow(array).to_pylist() == expected
    assert matcher.match_arrow(array.cast(pa.large_string())).to_pylist() == expected
    chunked = pa.chunked_array([array.slice(0, 150), array.slice(150, 0), array.slice(150)])
    result = matcher.match_arrow(chunked)
    assert result.type == pa.list_(pa.int32())
    assert result.to_pylist() == expected
    assert matcher.match_arrow(array.slice(33, 100)).to_pylist() == expected[33:133]


def test_many_rows_span_internal_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import kiln.data_curation.matching as matching

    monkeypatch.setattr(matching, "_CHUNK_ROWS", 7)
    rng = random.Random(99)
    entries = _entries_for(rng)
    texts = [_caption_for(rng, entries) for _ in range(100)]
    assert EntryMatcher(entries).match_many(texts) == [naive_match(t, entries) for t in texts]


def test_unmatchable_entries_raw_mode() -> None:
    entries = ["dog", "u.s.", "a\tb", "St. Louis", "u . s .", "red  circle", "line\nbreak"]
    found = unmatchable_entries(entries, normalized=False)
    assert [(i, e) for i, e, _ in found] == [
        (1, "u.s."),
        (2, "a\tb"),
        (3, "St. Louis"),
        (6, "line\nbreak"),
    ]
    assert "'u . s .'" in found[0][2]


def test_unmatchable_entries_normalized_mode() -> None:
    entries = [
        "dog",
        "new\u00a0york",
        "tokyo\u3000tower",
        unicodedata.normalize("NFD", "café"),
        "red  circle",
        "a ,  b",  # matchable: spacing() makes the double space after a comma
        "café",
    ]
    found = {i: why for i, _, why in unmatchable_entries(entries, normalized=True)}
    assert sorted(found) == [1, 2, 3, 4]
    assert "U+00A0" in found[1] and "U+3000" in found[2]
    assert "NFC" in found[3] and "double space" in found[4]
    assert unmatchable_entries(entries, normalized=False) == []


@pytest.mark.parametrize("seed", range(4))
def test_flagged_entries_never_match_normalized_captions(seed: int) -> None:
    """What `unmatchable_entries(normalized=True)` flags indeed never matches a caption that
    went through the text stage's normalization."""
    from kiln.data_curation.stages.text import normalize_text

    rng = random.Random(seed)
    entries = [*_entries_for(rng), "new\u00a0york", "red\u3000circle", "cafe\u0301"]
    flagged = {i for i, _, _ in unmatchable_entries(entries, normalized=True)}
    matcher = EntryMatcher(entries)
    captions = [normalize_text(_caption_for(rng, entries)) for _ in range(3000)]
    seen = {i for ids in matcher.match_many(captions) for i in ids}
    assert flagged and seen  # both sides are exercised
    assert not seen & flagged


def test_byte_classes_are_where_the_tokenizer_looks() -> None:
    """The tokenizer only classifies bytes < 0x40 and the backquote."""
    from kiln.data_curation.matching import _BYTE_CLASS

    assert all(b < 0x40 or b == 0x60 for b in range(256) if _BYTE_CLASS[b])


def test_int_map_finds_every_key_and_no_other() -> None:
    import numpy as np

    from kiln.data_curation.matching import _IntMap

    rng = np.random.default_rng(5)
    keys = np.unique(rng.integers(0, 2**40, 20_000))
    table = _IntMap(keys, keys * 3)
    absent = rng.integers(0, 2**40, 20_000)
    absent = absent[~np.isin(absent, keys)]
    queries = np.concatenate([keys, absent, keys[:10]])
    expected = np.concatenate([keys * 3, np.full(absent.size, -1), keys[:10] * 3])
    assert (table.get(queries) == expected).all()
    assert table.get(np.zeros(0, np.int64)).size == 0
    assert (_IntMap(np.zeros(0, np.int64), np.zeros(0, np.int64)).get(keys) == -1).all()


def test_token_lookup_is_exact_whatever_the_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashes only propose a token: a caption token with the hash of an entry token but other
    bytes is not taken for it, and entry tokens that share a hash still work."""
    import numpy as np

    import kiln.data_curation.matching as matching

    by_length = lambda offsets, data: np.diff(offsets).astype(np.int64)  # noqa: E731
    monkeypatch.setattr(matching, "_hash_strings", by_length)
    entries = ["a", "bb", "ccc dddd"]  # tokens of distinct lengths: no shared hash
    texts = ["x bb", "xx", "ccc dddd", "ccc xxxx", "a b c"]
    expected = [naive_match(t, entries) for t in texts]
    assert expected == [[1], [], [2], [], [0]]
    matcher = EntryMatcher(entries)
    assert matcher._vocab._exact is None  # the hash + byte check path
    assert matcher.match_many(texts) == expected
    shared = ["ab", "cd", "ab cd", "e"]  # "ab" and "cd" share a hash: exact fallback
    texts = ["ab", "cd ab cd", "xy", "e f"]
    matcher = EntryMatcher(shared)
    assert matcher._vocab._exact is not None
    assert matcher.match_many(texts) == [naive_match(t, shared) for t in texts]


def test_bytes_and_other_objects_are_not_captions() -> None:
    matcher = EntryMatcher(["x", "1.5"])
    assert matcher.match_many([b"x", 1.5, "x", "1 . 5"]) == [[], [], [0], []]  # type: ignore[list-item]
    assert matcher.match_arrow(pa.array([b"x"])).to_pylist() == [[]]
