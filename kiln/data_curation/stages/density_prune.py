"""Density-based pruning (fit + apply): keep more of the complex, sparse concept clusters.

The rule of Abbas et al., "Effective pruning of web-scale datasets based on complexity of
concept clusters" (ICLR 2024). Fit: spherical k-means (faiss) on a seeded uniform sample of
the embeddings (`kiln.data_curation.clustering`), then per cluster j:
- `d_intra[j]`: mean cosine distance of its members to its centroid;
- `d_inter[j]`: mean cosine distance of its centroid to the `num_neighbors` nearest other
  centroids;
- `p = softmax(d_intra * d_inter / temperature)`;
- budgets `x` for `N = round(keep_fraction * rows)` kept rows: the paper's quadratic
  program `min 1/2 |x|^2 - (p N)^T x` s.t. `sum(x) = N`, `lb <= x <= n` with
  `lb[j] = min(N / k * balance_ratio, n[j] - 1)` (at least 0). With box constraints and one
  equality its solution is `x[j] = clip(p[j] N - lam, lb[j], n[j])` for the multiplier `lam`
  where the sum is N: `water_fill` finds it by bisection and then solves exactly on the free
  set (no QP library needed; the tests check it against an active-set enumeration);
- each cluster keeps its budget (rounded by largest remainder) of members: `hard` the
  farthest from the centroid (the paper's choice), `easy` the nearest, `random` by a (seed,
  uid) hash. The state holds each cluster's rank threshold, so `apply` decides row by row.

When the pool is no larger than `sample_size` the sample is the pool and the counts and
thresholds are exact; above it, the cluster sizes and rank thresholds are estimated from the
uniform sample (the kept fraction then holds in expectation). Empty clusters get no budget.
Drops: `density_pruned`, and `bad_embedding` for unusable embeddings. Adds `cluster`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

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
from kiln.data_curation.stage import FitApplyStage, register
from kiln.data_curation.stages import alive_mask, mark_dropped, replace_column

__all__ = [
    "DensityPruneConfig",
    "DensityPruneStage",
    "cluster_budgets",
    "largest_remainder",
    "water_fill",
]

REASON = "density_pruned"
CLUSTER_COLUMN = "cluster"


class DensityPruneConfig(StrictModel):
    """Density-based pruning: per-cluster budgets from cluster complexity."""

    column: str = Field(default=IMAGE_EMBEDDING, description="embedding column to cluster")
    keep_fraction: float = Field(gt=0.0, le=1.0, description="fraction of the rows to keep")
    num_clusters: int = Field(default=100, ge=1, description="k of the spherical k-means")
    temperature: float = Field(
        default=0.1, gt=0.0, description="softmax temperature over d_intra * d_inter"
    )
    num_neighbors: int = Field(
        default=20, ge=1, description="nearest other centroids averaged into d_inter"
    )
    balance_ratio: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="each cluster keeps at least min(N / k * balance_ratio, n - 1) rows",
    )
    which_to_keep: Literal["hard", "easy", "random"] = Field(
        default="hard",
        description="members a cluster keeps: farthest from the centroid (hard), nearest "
        "(easy) or a seeded random choice",
    )
    seed: int = Field(default=0, description="seed of the k-means and of the random choice")
    niter: int = Field(default=20, ge=1, description="k-means iterations")
    sample_size: int = Field(
        default=100_000,
        ge=1,
        description="rows the k-means and the cluster statistics come from (a seeded "
        "uniform sample; exact when the pool is smaller)",
    )


def water_fill(a: np.ndarray, lb: np.ndarray, ub: np.ndarray, total: float) -> np.ndarray:
    """The solution of `min 1/2 |x|^2 - a^T x` s.t. `sum(x) = total`, `lb <= x <= ub`:
    `x = clip(a - lam, lb, ub)` with `lam` found by bisection, then solved exactly on the
    coordinates strictly inside their bounds."""
    a, lb, ub = (np.asarray(v, dtype=np.float64) for v in (a, lb, ub))
    if (lb > ub + 1e-12).any():
        raise ValueError("a lower bound is above its upper bound")
    lo_sum, hi_sum = float(lb.sum()), float(ub.sum())
    tol = 1e-9 * max(1.0, abs(total))
    if total < lo_sum - tol or total > hi_sum + tol:
        raise ValueError(
            f"no budgets can sum to {total:g}: the bounds allow [{lo_sum:g}, {hi_sum:g}] "
            "(lower balance_ratio, or raise keep_fraction)"
        )

    def f(lam: float) -> float:
        return float(np.clip(a - lam, lb, ub).sum())

    lo = float(np.min(a - ub)) - 1.0  # f(lo) = sum(ub) >= total
    hi = float(np.max(a - lb)) + 1.0  # f(hi) = sum(lb) <= total
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) > total:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, abs(lo)):
            break
    lam = 0.5 * (lo + hi)
    y = a - lam
    free = (y > lb) & (y < ub)
    if free.any():
        fixed = np.where(y <= lb, lb, ub)[~free].sum()
        lam = float((a[free].sum() + fixed - total) / free.sum())
    return np.clip(a - lam, lb, ub)


def largest_remainder(x: np.ndarray, total: int, cap: np.ndarray) -> np.ndarray:
    """Integers near `x` summing to `total` (floors, then +1 by largest fractional part,
    ties to the lower index), each at most `cap`."""
    base = np.minimum(np.floor(x + 1e-9).astype(np.int64), cap)
    left = int(total - base.sum())
    if left > 0:
        frac = np.where(base < cap, x - base, -np.inf)
        order = np.lexsort((np.arange(len(x)), -frac))
        base[order[:left]] += 1
    return np.minimum(base, cap)


def cluster_budgets(
    n: np.ndarray, d_intra: np.ndarray, d_inter: np.ndarray, keep: int, cfg: DensityPruneConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(p, x): the softmax weights and the QP budgets of clusters with sizes `n` (empty
    clusters get p = 0 and x = 0)."""
    n = np.asarray(n, dtype=np.float64)
    nonempty = n > 0
    k = int(nonempty.sum())
    p = np.zeros(len(n))
    x = np.zeros(len(n))
    if k == 0:
        return p, x
    score = (d_intra * d_inter)[nonempty] / cfg.temperature
    e = np.exp(score - score.max())
    p[nonempty] = e / e.sum()
    lb = np.maximum(0.0, np.minimum(keep / k * cfg.balance_ratio, n - 1.0))
    lb[~nonempty] = 0.0
    x = water_fill(p * keep, lb, n, float(keep))
    return p, x


@dataclass(frozen=True)
class _Fitted:
    centroids: np.ndarray
    primary: np.ndarray  # per cluster: rank threshold (keep rank keys <= it)
    tie_hash: np.ndarray


def _rank_primary(distance: np.ndarray, which: str) -> np.ndarray:
    if which == "hard":
        return -distance
    if which == "easy":
        return distance
    return np.zeros_like(distance)


class DensityPruneStage(FitApplyStage[DensityPruneConfig]):
    """Density-based pruning with per-cluster budgets from a QP (water-filling)."""

    name = "density_prune"
    config = DensityPruneConfig
    summary = "density-based pruning: per-cluster budgets from cluster complexity (k-means)"
    adds = (CLUSTER_COLUMN,)
    drop_reasons: ClassVar[dict[str, str]] = {
        REASON: "its k-means cluster's budget (density-based pruning) keeps other members",
        BAD_EMBEDDING: "the embedding is missing, not finite, all zero or of the wrong length",
    }

    def fit(self, table: pa.Table, cfg: DensityPruneConfig, ctx: Any) -> pa.Table:
        return sample_embeddings(table, cfg.column, cfg.seed, cfg.sample_size)

    def merge(self, partials: list[pa.Table], cfg: DensityPruneConfig) -> pa.Table:
        return merge_samples(partials, cfg.sample_size)

    def finish(self, merged: pa.Table, cfg: DensityPruneConfig) -> pa.Table:
        x = sample_matrix(merged)
        centroids = train_centroids(x, cfg.num_clusters, seed=cfg.seed, niter=cfg.niter)
        k = len(centroids)
        cluster = assign(x, centroids)
        dist = centroid_distance(x, centroids, cluster)
        rows = sample_rows(merged)
        scale = rows / max(1, len(x))
        n_sample = np.bincount(cluster, minlength=k)
        d_intra = np.bincount(cluster, weights=dist, minlength=k) / np.maximum(n_sample, 1)
        nonempty = n_sample > 0
        d_inter = np.ones(k)
        others = np.flatnonzero(nonempty)
        if len(others) > 1:
            cd = 1.0 - centroids[others].astype(np.float64) @ centroids[others].T.astype(np.float64)
            np.fill_diagonal(cd, np.inf)
            m = min(cfg.num_neighbors, len(others) - 1)
            d_inter[others] = np.sort(cd, axis=1)[:, :m].mean(axis=1)
        n_est = n_sample * scale
        keep = round(cfg.keep_fraction * rows)
        p, budget = cluster_budgets(n_est, d_intra, d_inter, keep, cfg)
        kept_sample = largest_remainder(budget / scale, round(budget.sum() / scale), n_sample)
        primary = np.full(k, np.inf)
        tie = np.full(k, np.iinfo(np.uint64).max, dtype=np.uint64)
        h = merged.column("hash").to_numpy() if len(x) else np.zeros(0, np.uint64)
        key = _rank_primary(dist, cfg.which_to_keep)
        for j in range(k):
            members = np.flatnonzero(cluster == j)
            b = int(kept_sample[j])
            if b >= len(members):
                continue  # keeps everything (unseen members too)
            if b == 0:
                primary[j], tie[j] = -np.inf, 0
                continue
            order = members[np.lexsort((h[members], key[members]))]
            last = order[b - 1]
            primary[j], tie[j] = key[last], h[last]
        return pa.table(
            {
                "cluster": pa.array(np.arange(k), pa.int32()),
                "centroid": embedding_array(centroids),
                "n": pa.array(n_est, pa.float64()),
                "d_intra": pa.array(d_intra, pa.float64()),
                "d_inter": pa.array(d_inter, pa.float64()),
                "p": pa.array(p, pa.float64()),
                "budget": pa.array(budget, pa.float64()),
                "threshold": pa.array(primary, pa.float64()),
                "tie_hash": pa.array(tie, pa.uint64()),
            }
        ).replace_schema_metadata({b"kiln.rows": str(rows).encode(),
                                   b"kiln.sample": str(len(x)).encode()})  # fmt: skip

    def setup(self, cfg: DensityPruneConfig, state: pa.Table | None) -> _Fitted | None:
        if state is None:
            return None
        centroids, _ = read_embeddings(state, "centroid")
        return _Fitted(
            centroids=centroids,
            primary=state.column("threshold").to_numpy(),
            tie_hash=state.column("tie_hash").to_numpy(),
        )

    def apply(self, table: pa.Table, cfg: DensityPruneConfig, ctx: _Fitted) -> pa.Table:
        x, valid = read_embeddings(table, cfg.column, ctx.centroids.shape[1])
        x = l2_normalize(x)
        alive = alive_mask(table)
        cluster = assign(x, ctx.centroids)
        key = _rank_primary(centroid_distance(x, ctx.centroids, cluster), cfg.which_to_keep)
        h = uid_rank_hash(table.column("uid"), cfg.seed)
        t, th = ctx.primary[cluster], ctx.tie_hash[cluster]
        kept = (key < t) | ((key == t) & (h <= th))
        table = replace_column(
            table, CLUSTER_COLUMN, pa.array(cluster, pa.int32(), mask=~(valid & alive))
        )
        table = mark_dropped(table, alive & ~valid, BAD_EMBEDDING)
        return mark_dropped(table, alive & valid & ~kept, REASON)

    def report(
        self, summaries: list[pa.Table], cfg: DensityPruneConfig, state: pa.Table | None
    ) -> dict[str, Any]:
        if state is None:
            return {}
        meta = state.schema.metadata or {}
        budget = state.column("budget").to_numpy()
        n = state.column("n").to_numpy()
        return {
            "clusters": state.num_rows,
            "empty_clusters": int((n == 0).sum()),
            "kmeans_sample_rows": int(meta.get(b"kiln.sample", b"0")),
            "target_kept": round(float(budget.sum()), 3),
            "budget_fraction_min_max": [
                round(float((budget[n > 0] / n[n > 0]).min()), 4) if (n > 0).any() else None,
                round(float((budget[n > 0] / n[n > 0]).max()), 4) if (n > 0).any() else None,
            ],
        }


register(DensityPruneStage())
