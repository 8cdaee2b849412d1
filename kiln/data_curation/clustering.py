"""Spherical k-means for the pruning stages: a seeded sample, faiss training, assignment.

The fit of a clustering stage must be order-free and small, so each task keeps a uniform
*bottom-k sample* of its usable rows: the `sample_size` rows whose (seed, uid) hash is
smallest. Merging two such samples and keeping the k smallest again is associative and
order-free, and the result is the same sample whatever the number of tasks or blocks (the
whole pool when it is smaller than `sample_size`). `train_centroids` runs faiss's spherical
k-means on it (seeded), once, in the stage's `finish`. Rows are then assigned to the
nearest centroid by cosine similarity (`assign`), and ranked inside their cluster by
`centroid_distance` (1 - cosine, computed row by row in float64, so a row's distance does
not depend on the batch it came in).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from kiln.contracts import fnv1a64_strings, mix64, mix64_np
from kiln.data_curation.embeddings import embedding_array, l2_normalize, read_embeddings
from kiln.data_curation.stages import alive_mask

__all__ = [
    "assign",
    "centroid_distance",
    "merge_samples",
    "sample_embeddings",
    "sample_matrix",
    "sample_rows",
    "train_centroids",
    "uid_rank_hash",
]

logger = logging.getLogger("kiln.curation")

_ROWS_KEY = b"kiln.rows"


def uid_rank_hash(uids: pa.Array | pa.ChunkedArray, seed: int) -> np.ndarray:
    """A uint64 hash of (seed, uid) per row: the sample order and the seeded random order."""
    return mix64_np(fnv1a64_strings(uids) ^ np.uint64(mix64(seed + 0x5EED)))


def _with_rows(table: pa.Table, rows: int) -> pa.Table:
    return table.replace_schema_metadata({_ROWS_KEY: str(rows).encode()})


def sample_rows(table: pa.Table) -> int:
    """How many usable rows the sample was drawn from (kept in the schema metadata)."""
    meta = table.schema.metadata or {}
    return int(meta.get(_ROWS_KEY, b"0"))


def sample_embeddings(
    table: pa.Table, column: str, seed: int, sample_size: int, dim: int | None = None
) -> pa.Table:
    """The bottom-`sample_size` sample (by `uid_rank_hash`) of the alive rows of `table`
    that have a usable embedding: columns `hash` (uint64), `uid`, `embedding`; the number
    of usable rows in the schema metadata."""
    x, valid = read_embeddings(table, column, dim)
    usable = valid & alive_mask(table)
    uids = table.column("uid").combine_chunks().filter(pa.array(usable))
    h = uid_rank_hash(uids, seed)
    if not len(uids):
        return _with_rows(pa.table({"hash": pa.array([], pa.uint64()), "uid": uids}), 0)
    ranked = pa.table({"hash": pa.array(h, pa.uint64()), "uid": uids, "_i": np.arange(len(h))})
    ranked = ranked.sort_by([("hash", "ascending"), ("uid", "ascending")]).slice(0, sample_size)
    order = ranked.column("_i").to_numpy()
    sample = ranked.drop_columns(["_i"]).append_column(
        "embedding", embedding_array(x[usable][order])
    )
    return _with_rows(sample, int(usable.sum()))


def merge_samples(partials: list[pa.Table], sample_size: int) -> pa.Table:
    """The bottom-`sample_size` sample of the union of `partials` (order-free)."""
    rows = sum(sample_rows(p) for p in partials)
    parts = [p.replace_schema_metadata(None) for p in partials if p.num_rows]
    if not parts:
        return _with_rows(pa.table({"hash": pa.array([], pa.uint64())}), rows)
    merged = pa.concat_tables(parts).sort_by([("hash", "ascending"), ("uid", "ascending")])
    return _with_rows(merged.slice(0, sample_size), rows)


def sample_matrix(sample: pa.Table) -> np.ndarray:
    """The sample's embeddings as a unit-norm float32 matrix."""
    if sample.num_rows == 0 or "embedding" not in sample.column_names:
        return np.zeros((0, 0), dtype=np.float32)
    x, _ = read_embeddings(sample, "embedding")
    return l2_normalize(x)


def train_centroids(x: np.ndarray, num_clusters: int, *, seed: int, niter: int) -> np.ndarray:
    """Unit-norm centroids of spherical k-means (faiss) on the unit rows of `x`.

    Fewer clusters than asked when the sample has fewer rows (logged); an error when it
    has none."""
    import faiss

    n = x.shape[0]
    if n == 0:
        raise ValueError(
            "no row has a usable embedding, so there is nothing to cluster: check that the "
            "embed stage ran and that the rows are not all dropped before this stage"
        )
    k = min(num_clusters, n)
    if k < num_clusters:
        logger.warning(
            "k-means: %d clusters asked, but the sample has only %d rows: using %d",
            num_clusters,
            n,
            k,
        )
    km = faiss.Kmeans(
        x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False,
        max_points_per_centroid=max(256, -(-n // k)),
    )  # fmt: skip
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return l2_normalize(np.asarray(km.centroids, dtype=np.float32))


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index (int32) of the nearest centroid (largest cosine) of each unit row of `x`."""
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.int32)
    return np.argmax(x @ centroids.T, axis=1).astype(np.int32)


def centroid_distance(x: np.ndarray, centroids: np.ndarray, cluster: np.ndarray) -> np.ndarray:
    """1 - cosine of each unit row of `x` to its centroid, float64, row by row."""
    c = centroids[cluster].astype(np.float64)
    return 1.0 - np.einsum("ij,ij->i", x.astype(np.float64), c)
