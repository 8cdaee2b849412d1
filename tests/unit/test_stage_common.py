"""The stage contract helpers: drop_reason column, first reason wins, split and counts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from kiln.data_curation.stages import (
    DROP_COLUMN,
    alive_mask,
    count_reasons,
    ensure_drop_column,
    mark_dropped,
    split_dropped,
)


def _table(n: int = 5) -> pa.Table:
    return pa.table({"uid": [f"u{i}" for i in range(n)], "text": [f"t{i}" for i in range(n)]})


def test_ensure_drop_column_adds_null_strings_once() -> None:
    table = ensure_drop_column(_table())
    assert table.schema.field(DROP_COLUMN).type == pa.string()
    assert table.column(DROP_COLUMN).null_count == 5
    assert ensure_drop_column(table) is table


def test_ensure_drop_column_casts_null_type_and_rejects_other_types() -> None:
    table = _table(2).append_column(DROP_COLUMN, pa.nulls(2))
    assert ensure_drop_column(table).schema.field(DROP_COLUMN).type == pa.string()
    with pytest.raises(ValueError, match="drop_reason"):
        ensure_drop_column(_table(2).append_column(DROP_COLUMN, pa.array([1, 2])))


def test_mark_dropped_keeps_the_first_reason() -> None:
    table = mark_dropped(_table(), np.array([1, 1, 0, 0, 0], bool), "empty_text")
    table = mark_dropped(table, np.array([0, 1, 1, 0, 0], bool), "junk_text")
    assert table.column(DROP_COLUMN).to_pylist() == [
        "empty_text",
        "empty_text",
        "junk_text",
        None,
        None,
    ]
    assert alive_mask(table).tolist() == [False, False, False, True, True]


def test_mark_dropped_rejects_unknown_reason_and_bad_mask() -> None:
    with pytest.raises(ValueError, match="unknown drop reason 'typo'"):
        mark_dropped(_table(), np.zeros(5, bool), "typo")
    with pytest.raises(ValueError, match="shape"):
        mark_dropped(_table(), np.zeros(4, bool), "empty_text")


def test_alive_mask_without_column_is_all_true() -> None:
    assert alive_mask(_table(3)).tolist() == [True, True, True]


def test_split_and_count() -> None:
    table = mark_dropped(_table(), np.array([1, 0, 1, 0, 0], bool), "bad_image")
    table = mark_dropped(table, np.array([0, 0, 0, 1, 0], bool), "not_sampled")
    kept, dropped = split_dropped(table)
    assert kept.column("uid").to_pylist() == ["u1", "u4"]
    assert kept.column(DROP_COLUMN).null_count == 2
    assert dropped.column("uid").to_pylist() == ["u0", "u2", "u3"]
    assert kept.num_rows + dropped.num_rows == table.num_rows
    assert count_reasons(table) == {"bad_image": 2, "not_sampled": 1}
    assert count_reasons(_table()) == {}


def test_works_on_multi_chunk_tables() -> None:
    table = pa.concat_tables([_table(2), _table(3)])
    table = mark_dropped(table, np.array([0, 1, 0, 1, 0], bool), "empty_text")
    assert count_reasons(table) == {"empty_text": 2}
    kept, _ = split_dropped(table)
    assert kept.num_rows == 3
