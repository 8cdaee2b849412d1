"""Run a stage on a few rows without Ray, the way the runner calls it; tiny embedding pools.

`run_stage` follows the runner's phases: each task (a slice of the rows) fits and merges
its partials, one merge plus `finish` makes the state, `setup` builds the context, then
`apply` per task (map, fit + apply) or keys -> rows sorted by (key, uid, source,
source_row) -> `apply_groups` -> reasons written back (keyed). Tests use it to check that
results do not depend on how the rows are split into tasks.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kiln.data_curation.embeddings import embedding_array
from kiln.data_curation.stage import Stage
from kiln.data_curation.stages import DROP_COLUMN, ensure_drop_column, split_dropped

__all__ = ["embedding_table", "planted_embeddings", "run_stage"]


def run_stage(
    stage: Stage[Any], cfg: Any, table: pa.Table, *, tasks: int = 1
) -> tuple[pa.Table, pa.Table | None, list[pa.Table]]:
    """(output rows in input order, fitted state or None, summaries) of `stage` on `table`."""
    bounds = np.linspace(0, table.num_rows, tasks + 1).astype(int)
    slices = [table.slice(a, b - a) for a, b in itertools.pairwise(bounds)]
    state = None
    fitted = stage.kind == "fit_apply" or getattr(stage, "fits", False)
    if fitted:
        partials = [stage.merge([stage.fit(s, cfg, None)], cfg) for s in slices]  # type: ignore[attr-defined]
        state = stage.finish(stage.merge(partials, cfg), cfg)  # type: ignore[attr-defined]
    ctx = stage.setup(cfg, state)
    summaries: list[pa.Table] = []
    if stage.kind != "keyed":
        outs = [stage.apply(s, cfg, ctx) for s in slices]  # type: ignore[attr-defined]
        for out in outs:
            s = stage.summarize(split_dropped(out)[0], cfg, ctx)  # the runner: kept rows
            if s is not None:
                summaries.append(s)
        return pa.concat_tables(outs), state, summaries
    keys = pa.chunked_array([stage.key(s, cfg, ctx) for s in slices]).combine_chunks()  # type: ignore[attr-defined]
    columns = ["uid", "source", "source_row", *stage.carry(cfg)]  # type: ignore[attr-defined]
    index = table.select(columns).append_column("_key", keys)
    index = index.append_column("_row", pa.array(np.arange(table.num_rows)))
    index = index.filter(pc.is_valid(index.column("_key")))
    index = index.sort_by([("_key", "ascending"), ("uid", "ascending"), ("source", "ascending"),
                           ("source_row", "ascending")])  # fmt: skip
    group_keys = index.column("_key").combine_chunks()
    marked = ensure_drop_column(
        stage.apply_groups(index.drop_columns(["_key"]), group_keys, cfg, ctx)
    )  # type: ignore[attr-defined]
    summary = stage.summarize_groups(marked, group_keys, cfg, ctx)  # type: ignore[attr-defined]
    if summary is not None:
        summaries.append(summary)
    reasons: list[str | None] = [None] * table.num_rows
    for row, reason in zip(
        marked.column("_row").to_pylist(), marked.column(DROP_COLUMN).to_pylist(), strict=True
    ):
        reasons[row] = reason
    out = ensure_drop_column(table)
    given = pa.array(reasons, pa.string())
    out = out.set_column(out.schema.get_field_index(DROP_COLUMN), DROP_COLUMN,
                         pc.coalesce(out.column(DROP_COLUMN), given))  # fmt: skip
    return out, state, summaries


def embedding_table(x: np.ndarray, *, column: str = "image_embedding", **extra: Any) -> pa.Table:
    """Rows uid `u00000`.. with the embeddings `x` and the reader's order columns."""
    n = len(x)
    return pa.table(
        {
            "uid": pa.array([f"u{i:05d}" for i in range(n)]),
            "source": pa.array(["pool.parquet"] * n),
            "source_row": pa.array(np.arange(n), pa.int64()),
            column: embedding_array(x),
            **extra,
        }
    )


def planted_embeddings(
    n: int, dim: int, clusters: int, *, duplicates: int, seed: int = 0, noise: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """(`[n, dim]` unit rows in `clusters` blobs, the indices of the planted near-copies):
    the last `duplicates` rows are slightly perturbed copies of earlier rows."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    base = n - duplicates
    x = centers[rng.integers(clusters, size=base)] + 0.6 * rng.standard_normal((base, dim))
    src = rng.choice(base, size=duplicates, replace=False)
    copies = x[src] + noise * rng.standard_normal((duplicates, dim))
    x = np.concatenate([x, copies]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.arange(base, n)
