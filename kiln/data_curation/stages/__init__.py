"""Curation stages (one module each) and the row helpers every stage uses to mark drops.

The stage contract itself is `kiln.data_curation.stage`. A stage that
rejects a row writes the reason into the `drop_reason` column (string, null = kept) instead of
filtering it out, so the runner can count every drop by reason and write the rejects
table: no row is ever silently lost. A row keeps the *first* reason it was given, and later
stages skip rows that are already dropped (`alive_mask`). The helpers here are the only code
that reads or writes that column, so every stage follows the same rules.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "DROP_COLUMN",
    "alive_mask",
    "count_reasons",
    "ensure_drop_column",
    "mark_dropped",
    "replace_column",
    "split_dropped",
]

#: Name of the column that holds why a row was dropped (null: the row is kept).
DROP_COLUMN = "drop_reason"


def replace_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """`table` with column `name` set to `values`: replaced in place if present, else appended."""
    index = table.schema.get_field_index(name)
    if index >= 0:
        return table.set_column(index, name, values)
    return table.append_column(name, values)


def ensure_drop_column(table: pa.Table) -> pa.Table:
    """`table` with a `drop_reason` string column (all null when it was absent).

    A column of Arrow type `null` (what concatenating empty blocks can produce) is cast to
    string; any other non-string type is an error, since reasons are names.
    """
    index = table.schema.get_field_index(DROP_COLUMN)
    if index < 0:
        return table.append_column(DROP_COLUMN, pa.nulls(table.num_rows, type=pa.string()))
    column = table.column(index)
    if column.type == pa.string():
        return table
    if pa.types.is_null(column.type) or pa.types.is_large_string(column.type):
        return table.set_column(index, DROP_COLUMN, column.cast(pa.string()))
    raise ValueError(
        f"column {DROP_COLUMN!r} has type {column.type}, expected string: it is reserved for "
        "drop reasons; rename the input column that uses this name"
    )


def alive_mask(table: pa.Table) -> np.ndarray:
    """Boolean array, True where the row is not dropped (all True without a drop column)."""
    if DROP_COLUMN not in table.column_names:
        return np.ones(table.num_rows, dtype=bool)
    nulls = pc.is_null(table.column(DROP_COLUMN))
    return np.asarray(nulls.to_numpy(zero_copy_only=False), dtype=bool)


def mark_dropped(table: pa.Table, mask: np.ndarray, reason: str) -> pa.Table:
    """Set `drop_reason = reason` where `mask` is True and the row is not already dropped.

    A row keeps its first reason, so the order of stages decides what a rejected row is
    reported as. `reason` must be registered (a stage's `drop_reasons`, or
    `kiln.contracts.register_drop_reason`).
    """
    from kiln.data_curation.stage import known_drop_reasons

    known = known_drop_reasons()
    if reason not in known:
        raise ValueError(
            f"unknown drop reason {reason!r}: register it first (list it in the stage's "
            f"drop_reasons); registered: {', '.join(known)}"
        )
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (table.num_rows,):
        raise ValueError(
            f"mask has shape {mask.shape}, expected ({table.num_rows},): one flag per row"
        )
    table = ensure_drop_column(table)
    if not mask.any():
        return table
    current = table.column(DROP_COLUMN).combine_chunks()
    update = pc.and_(pa.array(mask, type=pa.bool_()), pc.is_null(current))
    updated = pc.if_else(update, pa.scalar(reason, pa.string()), current)
    return replace_column(table, DROP_COLUMN, updated)


def split_dropped(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(kept, dropped): both keep the `drop_reason` column; it is null on every kept row."""
    table = ensure_drop_column(table)
    alive = pa.array(alive_mask(table), type=pa.bool_())
    return table.filter(alive), table.filter(pc.invert(alive))


def count_reasons(table: pa.Table) -> dict[str, int]:
    """Number of dropped rows per reason (reasons with no rows are left out)."""
    if DROP_COLUMN not in table.column_names or table.num_rows == 0:
        return {}
    counts = pc.value_counts(table.column(DROP_COLUMN).combine_chunks())
    result: dict[str, int] = {}
    for item in counts.to_pylist():
        if item["values"] is not None:
            result[item["values"]] = int(item["counts"])
    return dict(sorted(result.items()))
