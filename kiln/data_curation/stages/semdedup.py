"""SemDeDup (fit + keyed): drop semantic near-duplicates inside k-means clusters.

Fit: a seeded uniform sample of the embeddings (`kiln.data_curation.clustering`), spherical
k-means with faiss on it; the unit-norm centroids are the step's persisted state
(`steps/{name}/state.parquet`). Key: each row's nearest centroid, so every cluster lands in
one group task, with its embeddings (`carry`). Per cluster, the reference rule of
facebookresearch/SemDeDup (`semdedup.py`): order the members by distance to the centroid
(`hard`: farthest first, as the paper keeps; `easy`: nearest first; `random`: by a (seed,
uid) hash), compute `M[j] = max(0, max_{i<j} cos(x_i, x_j))` over *every* member ranked
before `j` (removed ones included, so chains of near-duplicates go too), and remove `j`
when `M[j] > 1 - eps`. A cluster is compared in blocks of `block_rows` rows against the rows
before them, so memory is `block_rows` x cluster size floats whatever the cluster's size,
and the result is the same as the whole-matrix computation (the same dot products, the
same max). Ties in distance keep the (uid, source, source_row) order the runner sorts by.

`eps` may be a list: the first decides the drops, and the step reports the kept fraction
for each (what the paper sweeps to pick eps). Rows whose embedding is unusable (null, NaN,
wrong length) are dropped as `bad_embedding`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from kiln.contracts import StrictModel
from kiln.data_curation.clustering import (
    assign,
    centroid_distance,
    merge_samples,
    sample_embeddings,
    sample_matrix,
    sample_rows,
    train_centroids,
    uid_rank_hash,
)
from kiln.data_curation.embeddings import (
    BAD_EMBEDDING,
    IMAGE_EMBEDDING,
    embedding_array,
    l2_normalize,
    read_embeddings,
)
from kiln.data_curation.stage import KeyedStage, register
from kiln.data_curation.stages import alive_mask, mark_dropped

__all__ = [
    "SemDedupConfig",
    "SemDedupStage",
    "cluster_order",
    "max_similarity_to_earlier",
    "semdedup_cluster",
]

REASON = "semantic_duplicate"
_BAD_KEY = -1  # the group of rows whose embedding cannot be used
_MAX_SIM = "_semdedup_max_sim"  # M of each grouped row, from apply_groups to the summary


class SemDedupConfig(StrictModel):
    """SemDeDup: k-means clusters, then near-duplicates within each cluster."""

    column: str = Field(
        default=IMAGE_EMBEDDING,
        description="embedding column to deduplicate on (image_embedding or text_embedding)",
    )
    num_clusters: int = Field(
        default=100, ge=1, description="k of the spherical k-means (the paper: 50k for LAION-440M)"
    )
    eps: float | list[float] = Field(
        default=0.05,
        description="remove a row whose cosine similarity to an earlier member of its cluster "
        "exceeds 1 - eps; a list reports the kept fraction for each, the first decides",
    )
    which_to_keep: Literal["hard", "easy", "random"] = Field(
        default="hard",
        description="order inside a cluster, the first of a duplicate chain survives: hard "
        "(farthest from the centroid first), easy (nearest first) or random (seeded)",
    )
    seed: int = Field(default=0, description="seed of the k-means and of the random order")
    niter: int = Field(default=20, ge=1, description="k-means iterations")
    sample_size: int = Field(
        default=100_000,
        ge=1,
        description="rows the k-means is trained on (a seeded uniform sample; the whole "
        "pool when smaller)",
    )
    block_rows: int = Field(
        default=2048,
        ge=1,
        description="cluster rows compared at once: memory is block_rows x cluster size "
        "floats; any value gives the same removals",
    )
    dim: int | None = Field(
        default=None, ge=1, description="expected embedding dimension (None: any, as found)"
    )

    @field_validator("eps")
    @classmethod
    def _check_eps(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values:
            raise ValueError("eps is an empty list: give at least one value in (0, 1)")
        for e in values:
            if not 0.0 < e < 1.0:
                raise ValueError(
                    f"eps={e} is outside (0, 1): it is a cosine distance, e.g. 0.05 removes "
                    "rows more than 0.95 similar to an earlier one"
                )
        return v

    def eps_list(self) -> list[float]:
        """Every eps, the one that decides first."""
        return list(self.eps) if isinstance(self.eps, list) else [self.eps]


def cluster_order(distance: np.ndarray, uids: pa.Array | None, which: str, seed: int) -> np.ndarray:
    """Positions of a cluster's members in SemDeDup order (stable: ties keep input order)."""
    if which == "hard":
        return np.argsort(-distance, kind="stable")
    if which == "easy":
        return np.argsort(distance, kind="stable")
    assert uids is not None
    return np.argsort(uid_rank_hash(uids, seed), kind="stable")


def max_similarity_to_earlier(x: np.ndarray, block_rows: int = 2048) -> np.ndarray:
    """`M[j] = max(0, max_{i<j} x_i . x_j)` for the rows of `x` in order (the reference's
    `max(triu(X X^T, 1), dim=0)`), computed `block_rows` rows at a time."""
    m = x.shape[0]
    out = np.zeros(m, dtype=np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    for a in range(0, m, block_rows):
        b = min(m, a + block_rows)
        block = x[a:b]
        best = np.tril(block @ block.T, -1).max(axis=1)  # earlier rows of the block; 0 floor
        if a:
            np.maximum(best, (block @ x[:a].T).max(axis=1), out=best)  # rows of earlier blocks
        np.maximum(best, 0.0, out=out[a:b])
    return out


def semdedup_cluster(
    x: np.ndarray,
    centroid: np.ndarray,
    uids: pa.Array | None,
    cfg: SemDedupConfig,
) -> np.ndarray:
    """`M` of each member of one cluster (unit rows `x`), in the cluster's input order."""
    distance = centroid_distance(x, centroid[None, :], np.zeros(len(x), dtype=np.int64))
    order = cluster_order(distance, uids, cfg.which_to_keep, cfg.seed)
    m_sorted = max_similarity_to_earlier(x[order], cfg.block_rows)
    m = np.empty_like(m_sorted)
    m[order] = m_sorted
    return m


@dataclass(frozen=True)
class _Fitted:
    centroids: np.ndarray


class SemDedupStage(KeyedStage[SemDedupConfig]):
    """SemDeDup: k-means (fit), then per cluster the reference near-duplicate rule."""

    name = "semdedup"
    config = SemDedupConfig
    fits = True
    summary = "SemDeDup: drop semantic near-duplicates within k-means clusters of embeddings"
    drop_reasons: ClassVar[dict[str, str]] = {
        REASON: "cosine similarity to an earlier member of its k-means cluster above 1 - eps",
        BAD_EMBEDDING: "the embedding is missing, not finite, all zero or of the wrong length",
    }

    def carry(self, cfg: SemDedupConfig) -> tuple[str, ...]:
        return (cfg.column,)

    def setup(self, cfg: SemDedupConfig, state: pa.Table | None) -> _Fitted | None:
        if state is None:
            return None
        x, _ = read_embeddings(state, "centroid")
        return _Fitted(centroids=x)

    def fit(self, table: pa.Table, cfg: SemDedupConfig, ctx: Any) -> pa.Table:
        return sample_embeddings(table, cfg.column, cfg.seed, cfg.sample_size, cfg.dim)

    def merge(self, partials: list[pa.Table], cfg: SemDedupConfig) -> pa.Table:
        return merge_samples(partials, cfg.sample_size)

    def finish(self, merged: pa.Table, cfg: SemDedupConfig) -> pa.Table:
        centroids = train_centroids(
            sample_matrix(merged), cfg.num_clusters, seed=cfg.seed, niter=cfg.niter
        )
        state = pa.table(
            {
                "cluster": pa.array(np.arange(len(centroids)), pa.int32()),
                "centroid": embedding_array(centroids),
            }
        )
        meta = {b"kiln.rows": str(sample_rows(merged)).encode(),
                b"kiln.sample": str(merged.num_rows).encode()}  # fmt: skip
        return state.replace_schema_metadata(meta)

    def key(self, table: pa.Table, cfg: SemDedupConfig, ctx: _Fitted) -> pa.Array:
        x, valid = read_embeddings(table, cfg.column, ctx.centroids.shape[1])
        cluster = assign(l2_normalize(x), ctx.centroids)
        cluster[~valid] = _BAD_KEY
        return pa.array(cluster, pa.int32(), mask=~alive_mask(table))

    def apply_groups(
        self, table: pa.Table, keys: pa.Array, cfg: SemDedupConfig, ctx: _Fitted
    ) -> pa.Table:
        k = np.asarray(keys.to_numpy(zero_copy_only=False))
        x, _ = read_embeddings(table, cfg.column, ctx.centroids.shape[1])
        x = l2_normalize(x)
        m = self._max_sims(table, k, x, cfg, ctx)
        table = mark_dropped(table, k == _BAD_KEY, BAD_EMBEDDING)
        table = mark_dropped(table, m > 1.0 - cfg.eps_list()[0], REASON)
        return table.append_column(_MAX_SIM, pa.array(m, pa.float32()))  # for the summary

    def _max_sims(
        self, table: pa.Table, k: np.ndarray, x: np.ndarray, cfg: SemDedupConfig, ctx: _Fitted
    ) -> np.ndarray:
        """`M` of every row (0 for the bad-embedding group), cluster by cluster."""
        m = np.zeros(len(k), dtype=np.float32)
        if not len(k):
            return m
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        ends = np.r_[starts[1:], len(k)]
        uids = table.column("uid").combine_chunks()
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            if k[a] == _BAD_KEY:
                continue
            group_uids = uids.slice(a, b - a) if cfg.which_to_keep == "random" else None
            m[a:b] = semdedup_cluster(x[a:b], ctx.centroids[k[a]], group_uids, cfg)
        return m

    def summarize_groups(
        self, marked: pa.Table, keys: pa.Array, cfg: SemDedupConfig, ctx: _Fitted
    ) -> pa.Table | None:
        k = np.asarray(keys.to_numpy(zero_copy_only=False))
        good = k != _BAD_KEY
        m = marked.column(_MAX_SIM).to_numpy()[good]
        eps = cfg.eps_list()
        return pa.table(
            {
                "eps": pa.array(eps, pa.float64()),
                "removed": pa.array([int((m > 1.0 - e).sum()) for e in eps], pa.int64()),
                "rows": pa.array([int(good.sum())] * len(eps), pa.int64()),
                "clusters": pa.array([len(np.unique(k[good]))] * len(eps), pa.int64()),
            }
        )

    def report(
        self, summaries: list[pa.Table], cfg: SemDedupConfig, state: pa.Table | None
    ) -> dict[str, Any]:
        eps = cfg.eps_list()
        removed = dict.fromkeys(eps, 0)
        rows = 0
        clusters = 0
        for s in summaries:
            if "eps" not in s.column_names:
                continue
            for e, r in zip(
                s.column("eps").to_pylist(), s.column("removed").to_pylist(), strict=True
            ):
                removed[e] = removed.get(e, 0) + r
            rows += s.column("rows")[0].as_py()
            clusters += s.column("clusters")[0].as_py()
        meta = (state.schema.metadata or {}) if state is not None else {}
        return {
            "clusters": state.num_rows if state is not None else 0,
            "clusters_with_rows": clusters,
            "kmeans_sample_rows": int(meta.get(b"kiln.sample", b"0")),
            "rows_clustered": rows,
            "kept_fraction_by_eps": {
                str(e): round(1.0 - removed[e] / rows, 6) if rows else 1.0 for e in eps
            },
        }


register(SemDedupStage())
