"""MetaCLIP matching (reference semantics, Aho-Corasick == naive loop) and balancing."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kiln.data_curation.matching import EntryMatcher, load_entries, naive_match, spacing
from kiln.data_curation.stages import DROP_COLUMN, count_reasons, mark_dropped
from kiln.data_curation.stages.metaclip_balance import (
    balance_effect,
    dense_counts,
    entry_hashes,
    keep_probabilities,
    merge_counts,
    sparse_counts,
    uid_hashes,
    uniform_draw,
    uniform_draws,
)
from kiln.data_curation.stages.metaclip_balance import balance_table as _balance_table
from kiln.data_curation.stages.metaclip_match import match_table

ENTRIES = [f"entry{i}" for i in range(5)]


def count_entries(table: pa.Table, num_entries: int) -> np.ndarray:
    return dense_counts(sparse_counts(table), num_entries)


def balance_table(table: pa.Table, counts: np.ndarray, t: int, seed: int) -> pa.Table:
    """Balancing with entry strings `entry{i}` (draws are keyed by the string)."""
    entries = [f"entry{i}" for i in range(len(counts))]
    return _balance_table(table, keep_probabilities(counts, t), entry_hashes(entries), seed)


def test_spacing_matches_reference_steps() -> None:
    assert spacing("a dog.") == " a dog .  "
    assert spacing("x,y;z:w?v!u`t") == " x , y ; z : w ? v ! u ` t "
    assert spacing("a\tb\nc\rd") == " a b c d "


@pytest.mark.parametrize(
    ("text", "entry", "expected"),
    [
        ("a dog.", "dog", True),
        ("a dog", "dog", True),
        ("dog", "dog", True),
        ("DOG", "dog", False),
        ("dog's bowl", "dog", False),
        ("(dog)", "dog", False),
        ("dogs", "dog", False),
        ("hotdog", "dog", False),
        ("3.5 stars", "3", True),
        ("3.5 stars", "5", True),
        ("dog,cat", "cat", True),
        ("a\tdog\nrunning", "dog running", True),  # tab / newline become spaces
        ("a dog\r\nrunning", "dog running", False),  # CRLF becomes two spaces
        ("a  dog", "dog", True),
        ("red  circle", "red circle", False),  # double space is not collapsed
        ("`dog`", "dog", True),
        ("dog-friendly", "dog", False),
        ("big red circle", "red circle", True),
        ("St. Louis", "St. Louis", False),  # punctuation in the entry never matches
    ],
)
def test_reference_examples(text: str, entry: str, expected: bool) -> None:
    entries = [entry]
    assert (naive_match(text, entries) == [0]) is expected
    assert EntryMatcher(entries).match(text) == naive_match(text, entries)


def test_overlapping_entries_all_count_once_per_text() -> None:
    entries = ["red", "red circle", "circle", "blue", "a red"]
    matcher = EntryMatcher(entries)
    assert matcher.match("a red circle and a red circle") == [0, 1, 2, 4]
    assert matcher.match("red red red") == [0]
    assert matcher.match("") == []
    assert matcher.match_many(["blue", None, "circle."]) == [[3], [], [2]]


def test_duplicate_and_empty_entry_lists() -> None:
    matcher = EntryMatcher(["dog", "cat", "dog"])
    assert matcher.match("a dog") == [0, 2] == naive_match("a dog", ["dog", "cat", "dog"])
    assert EntryMatcher([]).match("a dog") == []


def _random_caption(rng: random.Random, vocab: list[str]) -> str:
    pieces = []
    for _ in range(rng.randint(0, 12)):
        word = rng.choice(vocab)
        if rng.random() < 0.15:
            word += rng.choice([".", ",", "!", "?", ";", ":", "'s", "s", ")", "`"])
        if rng.random() < 0.1:
            word = rng.choice(["(", "`", "-", ""]) + word
        if rng.random() < 0.1:
            word = word.upper()
        pieces.append(word)
        pieces.append(rng.choice([" ", " ", " ", "  ", "\t", "\n", "\r\n", ""]))
    return "".join(pieces)


def test_entry_matcher_equals_naive_on_random_captions() -> None:
    rng = random.Random(1234)
    vocab = ["red", "blue", "dog", "cat", "a", "the", "3", "5", "on", "x", "dogs", "é", "日本"]
    entries = sorted(
        {" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 3))) for _ in range(120)}
    )
    entries += ["3.5", "dog's", "red,", "RED"]  # entries that can never match
    matcher = EntryMatcher(entries)
    captions = [_random_caption(rng, vocab) for _ in range(3000)]
    nonempty = 0
    for caption in captions:
        expected = naive_match(caption, entries)
        assert matcher.match(caption) == expected, caption
        nonempty += bool(expected)
    assert nonempty > 1000  # the generator does produce matches
    assert matcher.match_many(captions[:50]) == [naive_match(c, entries) for c in captions[:50]]


def test_matcher_pickles() -> None:
    matcher = EntryMatcher(["red", "red circle"])
    clone = pickle.loads(pickle.dumps(matcher))
    assert clone.entries == matcher.entries
    assert clone.match("a red circle") == [0, 1]
    assert len(clone) == 2


def test_load_entries(tmp_path: Path) -> None:
    path = tmp_path / "entries.txt"
    path.write_bytes(b"\xef\xbb\xbfdog\r\ncat\n\n   \nred circle\ndog\n3.5\n")
    assert load_entries(str(path)) == ["dog", "cat", "red circle", "3.5"]
    bad = tmp_path / "bad.txt"
    bad.write_text("dog\n cat\nred \nok\n")
    with pytest.raises(ValueError, match=r"bad\.txt.*lines 2, 3"):
        load_entries(str(bad))
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        load_entries(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no entries"):
        load_entries(str(empty))


def test_load_entries_from_memory_fs() -> None:
    import fsspec

    with fsspec.open("memory://kiln-test/entries.txt", "w") as f:
        f.write("a\nb\n")
    assert load_entries("memory://kiln-test/entries.txt") == ["a", "b"]


def _table(texts: list[str | None]) -> pa.Table:
    return pa.table(
        {
            "uid": [f"{i:032x}" for i in range(len(texts))],
            "text": pa.array(texts, type=pa.string()),
        }
    )


def test_match_table_and_counts() -> None:
    matcher = EntryMatcher(["red", "circle", "red circle", "zebra"])
    table = _table(["a red circle", "red", None, "a circle.", "red circle"])
    table = mark_dropped(table, np.array([0, 0, 0, 0, 1], bool), "junk_text")
    out = match_table(table, matcher)
    assert out.schema.field("entry_ids").type == pa.list_(pa.int32())
    assert out.column("entry_ids").to_pylist() == [[0, 1, 2], [0], [], [1], []]
    counts = count_entries(out, len(matcher))
    assert counts.dtype == np.int64
    assert counts.tolist() == [2, 2, 1, 0]
    # partial counts over blocks sum to the whole
    parts = [count_entries(out.slice(i, 2), 4) for i in range(0, 5, 2)]
    assert np.array_equal(sum(parts), counts)
    with pytest.raises(ValueError, match="out of range"):
        count_entries(out, 2)
    assert sparse_counts(out).to_pydict() == {"entry_id": [0, 1, 2], "count": [2, 2, 1]}


def test_keep_probabilities() -> None:
    probs = keep_probabilities(np.array([0, 1, 10, 20, 40, 1000]), t=20)
    assert probs.tolist() == [1.0, 1.0, 1.0, 1.0, 0.5, 0.02]


def test_uniform_draw_is_pure_and_in_range() -> None:
    assert uniform_draw(0, "u", "dog") == uniform_draw(0, "u", "dog")
    values = {uniform_draw(0, "u", f"e{e}") for e in range(100)}
    assert len(values) == 100 and all(0.0 <= v < 1.0 for v in values)
    assert uniform_draw(1, "u", "dog") != uniform_draw(0, "u", "dog")


def test_vectorized_draws_equal_the_scalar_reference() -> None:
    rng = random.Random(5)
    uids = [f"{rng.getrandbits(128):032x}" for _ in range(300)] + ["", "ü-uid", "a b"]
    entries = ["dog", "red circle", "", "日本", "3"]
    uh = uid_hashes(uids, seed=9)
    eh = entry_hashes(entries)
    got = uniform_draws(np.repeat(uh, len(entries)), np.tile(eh, len(uids)))
    want = [uniform_draw(9, u, e) for u in uids for e in entries]
    assert got.tolist() == want
    assert 0.45 < float(np.mean(got)) < 0.55


def test_string_hash_on_slices_chunks_and_lists() -> None:
    from kiln.contracts import fnv1a64, fnv1a64_strings

    words = ["", "a", "dog", "ü", "a" * 300, "日本語"]
    want = [fnv1a64(w.encode()) for w in words]
    assert fnv1a64_strings(words).tolist() == want
    arr = pa.array(["x", *words])
    assert fnv1a64_strings(arr.slice(1)).tolist() == want
    assert fnv1a64_strings(pa.chunked_array([words[:2], words[2:]])).tolist() == want
    assert fnv1a64(b"") == 0xCBF29CE484222325 and fnv1a64(b"a") == 0xAF63DC4C8601EC8C


def test_draws_are_keyed_by_entry_string_not_position() -> None:
    """Inserting an entry in the file must not change the draws of the other entries."""
    table, counts = _balance_fixture(2_000, seed=1)
    before = _balance_table(table, keep_probabilities(counts, 50), entry_hashes(ENTRIES), 3)
    # the same entries at new positions (a new entry inserted first): remap the ids
    shifted = ["new entry", *ENTRIES]
    ids = [[i + 1 for i in row] for row in table.column("entry_ids").to_pylist()]
    table2 = table.set_column(1, "entry_ids", pa.array(ids, type=pa.list_(pa.int32())))
    counts2 = np.concatenate([[0], counts])
    after = _balance_table(table2, keep_probabilities(counts2, 50), entry_hashes(shifted), 3)
    assert after.column(DROP_COLUMN).equals(before.column(DROP_COLUMN))


def test_balancing_golden_kept_set() -> None:
    """Pins the decisions for a fixed input and seed: a change here changes every dataset."""
    import hashlib

    table, counts = _balance_fixture(5_000, seed=2)
    out = balance_table(table, counts, t=200, seed=0)
    kept = sorted(
        u
        for u, r in zip(
            out.column("uid").to_pylist(), out.column(DROP_COLUMN).to_pylist(), strict=True
        )
        if r is None
    )
    digest = hashlib.sha256("\n".join(kept).encode()).hexdigest()
    assert (len(kept), digest[:16]) == GOLDEN_KEPT


def test_vectorized_balance_equals_a_plain_loop() -> None:
    """balance_table's numpy path against the definition, one uniform_draw per trial."""
    table, counts = _balance_fixture(3_000, seed=6)
    out = balance_table(table, counts, t=120, seed=4)
    probs = keep_probabilities(counts, 120)
    expected = []
    for uid, ids in zip(
        table.column("uid").to_pylist(), table.column("entry_ids").to_pylist(), strict=True
    ):
        if not ids:
            expected.append("no_metadata_match")
        elif any(uniform_draw(4, uid, f"entry{e}") < probs[e] for e in ids):
            expected.append(None)
        else:
            expected.append("not_sampled")
    assert out.column(DROP_COLUMN).to_pylist() == expected


def test_sparse_counts_merge_in_any_order() -> None:
    table, counts = _balance_fixture(1_000, seed=4)
    parts = [sparse_counts(table.slice(i, 97)) for i in range(0, 1_000, 97)]
    assert merge_counts(parts).equals(merge_counts(parts[::-1]))
    assert dense_counts(merge_counts(parts), 5).tolist() == counts.tolist()
    assert merge_counts([]).num_rows == 0


def _balance_fixture(n: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """n rows; entry e of 5 has weight ~ 1/(e+1)^2; some rows carry two entries."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, 6) ** 2
    primary = rng.choice(5, size=n, p=weights / weights.sum())
    ids: list[list[int]] = []
    for i, e in enumerate(primary):
        if i % 7 == 0:
            ids.append([])
        elif i % 5 == 0:
            ids.append(sorted({int(e), int((e + 1) % 5)}))
        else:
            ids.append([int(e)])
    table = pa.table(
        {
            "uid": [f"{i:032x}" for i in range(n)],
            "entry_ids": pa.array(ids, type=pa.list_(pa.int32())),
        }
    )
    return table, count_entries(table, 5)


def test_balancing_statistics() -> None:
    table, counts = _balance_fixture(30_000)
    t = 1500
    probs = keep_probabilities(counts, t)
    assert probs.min() < 0.2 and probs.max() == 1.0
    out = balance_table(table, counts, t=t, seed=7)
    reasons = out.column(DROP_COLUMN).to_pylist()
    ids = out.column("entry_ids").to_pylist()
    keep_prob = out.column("keep_prob").to_pylist()
    for i, row_ids in enumerate(ids):
        if not row_ids:
            assert reasons[i] == "no_metadata_match" and keep_prob[i] == 0.0
        else:
            assert reasons[i] in (None, "not_sampled")
            expected = 1.0 - np.prod([1.0 - probs[e] for e in row_ids])
            assert keep_prob[i] == pytest.approx(expected)
    # per single-entry group, kept fraction ~ min(1, t / count) within 5 sigma
    for e in range(5):
        rows = [i for i, r in enumerate(ids) if r == [e]]
        kept = sum(reasons[i] is None for i in rows)
        p = probs[e]
        sigma = np.sqrt(len(rows) * p * (1 - p)) + 1e-9
        assert abs(kept - p * len(rows)) <= 5 * sigma + 1, (e, kept, len(rows), p)
    # rows with two entries: kept with 1 - prod(1 - p)
    pairs = [i for i, r in enumerate(ids) if len(r) == 2]
    expected_kept = sum(keep_prob[i] for i in pairs)
    kept_pairs = sum(reasons[i] is None for i in pairs)
    sigma = np.sqrt(sum(keep_prob[i] * (1 - keep_prob[i]) for i in pairs))
    assert abs(kept_pairs - expected_kept) <= 5 * sigma + 1
    # the balanced distribution is flatter than the raw one
    kept_table = out.filter(pa.compute.is_null(out.column(DROP_COLUMN)))
    balanced = count_entries(kept_table, 5)
    assert balanced.max() / balanced.min() < counts.max() / counts.min() / 3


def test_balancing_is_independent_of_blocks_and_order() -> None:
    table, counts = _balance_fixture(3_000, seed=3)
    whole = balance_table(table, counts, t=100, seed=11)
    pieces = [
        balance_table(table.slice(i, 413), counts, t=100, seed=11) for i in range(0, 3000, 413)
    ]
    assert pa.concat_tables(pieces).equals(whole)
    reversed_table = table.take(pa.array(np.arange(2999, -1, -1)))
    backwards = balance_table(reversed_table, counts, t=100, seed=11)
    assert backwards.column(DROP_COLUMN).to_pylist()[::-1] == whole.column(DROP_COLUMN).to_pylist()
    other_seed = balance_table(table, counts, t=100, seed=12)
    assert other_seed.column(DROP_COLUMN).to_pylist() != whole.column(DROP_COLUMN).to_pylist()


def test_balance_respects_earlier_drops_and_checks_inputs() -> None:
    table = pa.table(
        {
            "uid": ["a", "b", "c"],
            "entry_ids": pa.array([[0], [0], []], type=pa.list_(pa.int32())),
        }
    )
    table = mark_dropped(table, np.array([1, 0, 0], bool), "junk_text")
    out = balance_table(table, np.array([1]), t=5, seed=0)
    assert out.column(DROP_COLUMN).to_pylist() == ["junk_text", None, "no_metadata_match"]
    assert count_reasons(out) == {"junk_text": 1, "no_metadata_match": 1}
    with pytest.raises(ValueError, match="metaclip_match"):
        balance_table(table.drop_columns(["entry_ids"]), np.array([1]), t=5, seed=0)
    with pytest.raises(ValueError, match="uid"):
        balance_table(table.drop_columns(["uid"]), np.array([1]), t=5, seed=0)
    with pytest.raises(ValueError, match="entry id outside"):
        balance_table(table, np.array([], dtype=np.int64), t=5, seed=0)


def test_balance_effect_reports_head_counts_and_flattening() -> None:
    before = np.array([100, 10, 0, 4, 10])
    after = np.array([20, 10, 0, 4, 10])
    effect = balance_effect(["a", "b", "c", "d", "e"], before, after, top=3)
    assert effect["top"] == [["a", 100, 20], ["b", 10, 10], ["e", 10, 10]]
    assert effect["max_over_median"] == [10.0, 2.0]  # median of matched entries is 10


#: (number kept, sha256 prefix of the sorted kept uids) of `test_balancing_golden_kept_set`.
GOLDEN_KEPT = (872, "54d9494fde0877d8")
