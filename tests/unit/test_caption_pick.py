"""Multi-caption records: `input.text_columns` gives one row per text of a record, and the
`caption_pick` stage keeps one matched text per image with a seeded draw (MetaCLIP 2), while
a plan without it tests each text as its own pair (MetaCLIP 1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from kiln.data_curation.config import InputConfig
from kiln.data_curation.readers import read_file
from kiln.data_curation.stages.caption_pick import (
    CaptionPickConfig,
    CaptionPickStage,
    picked_mask,
)
from kiln.data_curation.stages.metaclip_balance import uniform_draw

RECORDS = [
    {"key": "r0", "alt": "a red dog", "title": "Dog photo", "url": "http://x/0.jpg"},
    {"key": "r1", "alt": None, "title": "a cat", "url": "http://x/1.jpg"},
    {"key": "r2", "alt": "same", "title": "same", "url": "http://x/2.jpg"},
]


def _read(path: Path, fmt: str, **fields: object) -> pa.Table:
    cfg = InputConfig(format=fmt, paths=[str(path)], **fields)  # type: ignore[arg-type]
    return pa.concat_tables(list(read_file(str(path), cfg)))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_text_columns_give_one_row_per_text_in_record_order(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"pool.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    else:
        pq.write_table(pa.Table.from_pylist(RECORDS), path)
    table = _read(path, fmt, text_columns=["alt", "title"], uid_column="key")
    assert table.column("text").to_pylist() == [
        "a red dog",
        "Dog photo",
        None,
        "a cat",
        "same",
        "same",
    ]
    assert table.column("source_row").to_pylist() == [0, 0, 1, 1, 2, 2]
    assert table.column("uid").to_pylist() == [
        f"{k}#{c}" for k in ("r0", "r1", "r2") for c in ("alt", "title")
    ]
    assert table.column("url").to_pylist() == [r["url"] for r in RECORDS for _ in range(2)]
    # without a uid column the uid is the (url, text) hash, as for any row
    plain = _read(path, fmt, text_columns=["title", "alt"])
    assert plain.column("text").to_pylist()[:2] == ["Dog photo", "a red dog"]
    assert len(set(plain.column("uid").to_pylist()[:4])) == 4


def test_text_columns_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"text_column and input\.text_columns are both set"):
        InputConfig(format="jsonl", paths=["p"], text_column="alt", text_columns=["alt"])
    with pytest.raises(ValidationError, match="list each text column once"):
        InputConfig(format="jsonl", paths=["p"], text_columns=["alt", "alt"])
    with pytest.raises(ValidationError, match="list each text column once"):
        InputConfig(format="jsonl", paths=["p"], text_columns=[])
    path = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    with pytest.raises(
        ValueError, match=r"input\.text_columns: 'caption' is not a column of .*alt, key, title"
    ):
        _read(path, "parquet", text_columns=["alt", "caption"])


def _matched(uids: list[str], rows: list[int], ids: list[list[int]]) -> pa.Table:
    return pa.table(
        {
            "uid": uids,
            "url": [f"u{r}" for r in rows],
            "source": ["pool.parquet"] * len(uids),
            "source_row": pa.array(rows, pa.int64()),
            "entry_ids": pa.array(ids, pa.list_(pa.int32())),
        }
    )


def test_key_is_the_record_or_url_and_null_without_a_match() -> None:
    stage = CaptionPickStage()
    table = _matched(["a", "b", "c"], [0, 0, 1], [[1], [], [2]])
    keys = stage.key(table, CaptionPickConfig(), None).to_pylist()
    assert keys == ["pool.parquet\x000", None, "pool.parquet\x001"]
    by_url = stage.key(table, CaptionPickConfig(by="url"), None).to_pylist()
    assert by_url == ["u0", None, "u1"]


def test_pick_keeps_the_smallest_seeded_draw_per_group() -> None:
    uids = pa.array([f"uid-{i}" for i in range(9)])
    keys = pa.array(["a", "a", "a", "b", "b", None, None, "c", "d"])
    keep = picked_mask(uids, keys, seed=3)
    draws = [uniform_draw(3, f"uid-{i}", "caption_pick") for i in range(9)]
    best_a = min(range(3), key=lambda i: draws[i])
    best_b = min(range(3, 5), key=lambda i: draws[i])
    want = [i in (best_a, best_b, 5, 6, 7, 8) for i in range(9)]
    assert keep.tolist() == want


def test_pick_is_uniform_and_depends_on_the_seed() -> None:
    n = 4000  # 2,000 records of two texts
    uids = pa.array([f"rec{i // 2}#{'alt' if i % 2 == 0 else 'title'}" for i in range(n)])
    keys = pa.array([f"rec{i // 2}" for i in range(n)])
    first = picked_mask(uids, keys, seed=0)
    assert first.reshape(-1, 2).sum(axis=1).tolist() == [1] * (n // 2)
    share_alt = first[0::2].mean()
    assert 0.45 < share_alt < 0.55
    other = picked_mask(uids, keys, seed=1)
    assert 0.4 < (first != other).reshape(-1, 2)[:, 0].mean() < 0.6


def test_apply_groups_marks_the_others_caption_not_picked() -> None:
    stage = CaptionPickStage()
    table = _matched(["x", "y", "z"], [0, 0, 1], [[1], [2], [3]])
    keys = stage.key(table, CaptionPickConfig(), None)
    out = stage.apply_groups(table, keys, CaptionPickConfig(), None)
    reasons = out.column("drop_reason").to_pylist()
    assert reasons.count("caption_not_picked") == 1 and reasons[2] is None
    assert np.array_equal(
        np.array([r is None for r in reasons]), picked_mask(table.column("uid"), keys, 0)
    )
