"""Precision / recall of planted near-duplicates and mismatches among removed rows."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.data_curation.pruning_scores import removed_uids, score_duplicates, score_mismatches


def test_duplicates_count_redundant_rows_per_group() -> None:
    groups = [["a", "a1", "a2"], ["b", "b1"], ["c", "c1"]]  # 4 redundant rows planted
    # group a: removing the source and one copy is right (2 hits); all three is one too many;
    # group b: the copy (1 hit); group c: nothing; "x" is not planted.
    score = score_duplicates(groups, {"a", "a1", "b1", "x"})
    assert score == {"planted": 4, "removed": 4, "hits": 3, "precision": 0.75, "recall": 0.75}
    over = score_duplicates(groups, {"a", "a1", "a2"})
    assert (over["hits"], over["precision"], over["recall"]) == (2, 2 / 3, 0.5)


def test_mismatches() -> None:
    score = score_mismatches(["m1", "m2", "m3", "m4"], {"m1", "m2", "y", "z", "w"})
    assert score == {"planted": 4, "removed": 5, "hits": 2, "precision": 0.4, "recall": 0.5}


def test_nothing_to_score_is_none_not_zero() -> None:
    assert score_duplicates([["a", "a1"]], set())["precision"] is None
    assert score_duplicates([], {"x"})["recall"] is None
    empty = score_mismatches([], set())
    assert (empty["precision"], empty["recall"]) == (None, None)


def test_removed_uids_reads_every_rejects_step(tmp_path: Path) -> None:
    def rejects(step: str, uids: list[str], reasons: list[str]) -> None:
        (tmp_path / "rejects" / step).mkdir(parents=True)
        table = pa.table({"uid": uids, "text": ["t"] * len(uids), "drop_reason": reasons})
        pq.write_table(table, tmp_path / "rejects" / step / "part-00000.parquet")

    rejects("text", ["t1", "t2"], ["junk_text", "empty_text"])
    rejects("semdedup", ["s1", "s2"], ["semantic_duplicate", "semantic_duplicate"])
    rejects("clip_score", ["c1"], ["low_clip_score"])
    assert removed_uids(str(tmp_path), ["semantic_duplicate"]) == {"s1", "s2"}
    both = removed_uids(str(tmp_path), ["semantic_duplicate", "low_clip_score"])
    assert both == {"s1", "s2", "c1"}
    assert removed_uids(str(tmp_path), ["density_pruned"]) == set()


def test_removed_uids_without_rejects_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="write_rejects"):
        removed_uids(str(tmp_path), ["semantic_duplicate"])
