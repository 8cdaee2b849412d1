"""SemDeDup per-cluster rule: kiln's `semdedup` stage against the reference's core rule.

Pool: `--rows` x `--dim` unit vectors in `--clusters` Gaussian blobs, the last
`--dup-fraction` of them near-copies (noise 1e-3) of earlier rows. Both sides get the same
cluster assignment (kiln's k-means: faiss on a seeded sample, then nearest centroid). The
baseline is a faithful copy of facebookresearch/SemDeDup's per-cluster computation
(`semdedup.py`: members sorted by distance to the centroid, farthest first, as
`sort_clusters.py` does for keep_hard; `X @ X.T`, `fill_diagonal_(0)`,
`triu(diagonal=1)`, `max(dim=0)`, remove where `M > 1 - eps`), in torch float32 on CPU.
Both sides order members by the same float64 distances: float32 distances of a planted
pair can tie and flip which copy survives, which is not a difference of the rule. kiln's side is the
stage's `apply_groups` on the rows sorted by cluster, as the runner calls it (Arrow in,
drop reasons out: reading the embeddings from Arrow included), comparing in blocks of
`block_rows`; `kiln_rule_seconds` times kiln's rule alone on the reference's inputs (numpy
arrays, orders given). The reference's side gets its arrays ready-made. Checks: identical
removals.

The large case (`--large-rows`) streams clusters one at a time (each generated from its own
seed, the blob identity as the assignment) through kiln's per-cluster rule in blocks, so
memory is one cluster plus a block x cluster matrix: it reports wall time and the peak RSS
of the process. Prints JSON.

Run: python benchmarks/bench_semdedup.py [--rows 100000] [--large-rows 1000000]
(`--rows 0` skips the comparison, `--large-rows 0` the large case: run them apart for a
peak RSS of the large case alone).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import pyarrow as pa
import torch

from kiln.data_curation.clustering import assign, centroid_distance, train_centroids
from kiln.data_curation.embeddings import embedding_array, l2_normalize
from kiln.data_curation.stages.semdedup import (
    SemDedupConfig,
    SemDedupStage,
    _Fitted,
    max_similarity_to_earlier,
)


def planted(rows: int, dim: int, clusters: int, dup_fraction: float, seed: int) -> np.ndarray:
    """Unit rows in blobs; the last `dup_fraction` are near-copies of distinct earlier rows."""
    rng = np.random.default_rng(seed)
    dups = int(rows * dup_fraction)
    base = rows - dups
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centers[rng.integers(clusters, size=base)]
    x += 0.8 * rng.standard_normal((base, dim)).astype(np.float32)
    src = rng.choice(base, size=dups, replace=False)
    copies = x[src] + 1e-3 * rng.standard_normal((dups, dim)).astype(np.float32)
    return l2_normalize(np.concatenate([x, copies]))


def reference_removed(x: np.ndarray, order: np.ndarray, eps: float) -> np.ndarray:
    """The reference's rule for one cluster given its member order, in the cluster's input
    order (bool)."""
    reps = torch.tensor(x[order])
    pair_w_sim_matrix = reps @ reps.T
    pair_w_sim_matrix.fill_diagonal_(0.0)
    triu_sim_mat = torch.triu(pair_w_sim_matrix, diagonal=1)
    m = torch.max(triu_sim_mat, dim=0)[0].numpy()
    removed = np.empty(len(x), dtype=bool)
    removed[order] = m > 1 - eps
    return removed


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compare(
    rows: int, dim: int, clusters: int, dup_fraction: float, eps: float
) -> dict[str, object]:
    x = planted(rows, dim, clusters, dup_fraction, seed=0)
    centroids = train_centroids(x[:100_000], clusters, seed=0, niter=20)
    cluster = assign(x, centroids)
    order = np.lexsort((np.arange(rows), cluster))  # the runner: rows sorted by key, uid
    uids = pa.array([f"{i:08d}" for i in range(rows)])
    table = pa.table(
        {
            "uid": uids.take(pa.array(order)),
            "source": pa.array(["p"] * rows),
            "source_row": pa.array(order, pa.int64()),
            "image_embedding": embedding_array(x[order]),
        }
    )
    keys = pa.array(cluster[order], pa.int32())
    stage = SemDedupStage()
    cfg = SemDedupConfig(num_clusters=clusters, eps=eps, block_rows=2048)
    start = time.perf_counter()
    marked = stage.apply_groups(table, keys, cfg, _Fitted(centroids=centroids))
    kiln_s = time.perf_counter() - start
    kiln_removed = np.zeros(rows, dtype=bool)
    kiln_removed[order] = np.asarray(
        marked.column("drop_reason").is_valid().to_numpy(zero_copy_only=False)
    )

    groups = []
    for c in np.unique(cluster):
        members = np.flatnonzero(cluster == c)
        dist = centroid_distance(x[members], centroids[c][None, :], np.zeros(len(members), int))
        order = np.argsort(-dist, kind="stable")  # sort_clusters.py, keep_hard: farthest first
        groups.append((members, order))
    start = time.perf_counter()
    ref_removed = np.zeros(rows, dtype=bool)
    for members, order in groups:
        ref_removed[members] = reference_removed(x[members], order, eps)
    ref_s = time.perf_counter() - start
    start = time.perf_counter()
    for members, order in groups:  # kiln's rule alone, on the same arrays
        max_similarity_to_earlier(x[members][order], cfg.block_rows)
    rule_s = time.perf_counter() - start
    planted_ids = np.arange(rows - int(rows * dup_fraction), rows)
    return {
        "rows": rows,
        "dim": dim,
        "clusters": clusters,
        "eps": eps,
        "kiln_seconds": round(kiln_s, 3),
        "reference_seconds": round(ref_s, 3),
        "speedup_vs_reference": round(ref_s / kiln_s, 2),
        "kiln_rule_seconds": round(rule_s, 3),
        "rule_speedup_vs_reference": round(ref_s / rule_s, 2),
        "removed": int(kiln_removed.sum()),
        "identical_removals": bool((kiln_removed == ref_removed).all()),
        "planted_duplicates": len(planted_ids),
        "planted_removed_or_their_source": int(kiln_removed[planted_ids].sum()),
        "torch_threads": torch.get_num_threads(),
    }


def large(rows: int, dim: int, clusters: int, eps: float, block_rows: int) -> dict[str, object]:
    """Stream `clusters` clusters of rows / clusters members through the per-cluster rule."""
    rss_before = _peak_rss_mb()
    per = rows // clusters
    removed = 0
    start = time.perf_counter()
    for c in range(clusters):
        x = planted(per, dim, 1, 0.05, seed=1000 + c)
        centroid = l2_normalize(x.mean(axis=0, keepdims=True))
        dist = centroid_distance(x, centroid, np.zeros(per, dtype=np.int64))
        m = max_similarity_to_earlier(x[np.argsort(-dist, kind="stable")], block_rows)
        removed += int((m > 1 - eps).sum())
    seconds = time.perf_counter() - start
    return {
        "rows": per * clusters,
        "clusters": clusters,
        "block_rows": block_rows,
        "seconds": round(seconds, 2),
        "removed": removed,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_rss_mb_before": round(rss_before, 1),
        "one_cluster_mb": round(per * dim * 4 / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--dup-fraction", type=float, default=0.05)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--large-rows", type=int, default=1_000_000)
    ap.add_argument("--block-rows", type=int, default=1024)
    args = ap.parse_args()
    out = {
        "compare": compare(args.rows, args.dim, args.clusters, args.dup_fraction, args.eps)
        if args.rows
        else None,
        "large": large(args.large_rows, args.dim, args.clusters, args.eps, args.block_rows)
        if args.large_rows
        else None,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
