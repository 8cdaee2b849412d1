"""Density-based pruning: the water-filling QP solution against an exact active-set
enumeration, the budgets, and the stage on a few rows without Ray."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from pydantic import ValidationError

from kiln.data_curation.clustering import assign, centroid_distance
from kiln.data_curation.embeddings import read_embeddings
from kiln.data_curation.stages.density_prune import (
    DensityPruneConfig,
    DensityPruneStage,
    largest_remainder,
    water_fill,
)
from tests.helpers_pruning import embedding_table, planted_embeddings, run_stage

STAGE = DensityPruneStage()


def _active_set_qp(a: np.ndarray, lb: np.ndarray, ub: np.ndarray, total: float) -> np.ndarray:
    """The QP's solution by trying every active set (each x_j at lb, at ub or free) and
    keeping the one that satisfies the KKT conditions: exact, independent, tiny k only."""
    k = len(a)
    for states in itertools.product((0, 1, 2), repeat=k):  # 0: lb, 1: free, 2: ub
        s = np.array(states)
        free = s == 1
        fixed = np.where(s == 0, lb, ub)
        if not free.any():
            if abs(fixed.sum() - total) > 1e-9:
                continue
            lam_lo = max([a[j] - ub[j] for j in range(k) if s[j] == 2], default=-np.inf)
            lam_hi = min([a[j] - lb[j] for j in range(k) if s[j] == 0], default=np.inf)
            if lam_lo <= lam_hi + 1e-12:
                return fixed.astype(float)
            continue
        lam = (a[free].sum() + fixed[~free].sum() - total) / free.sum()
        x = np.where(free, a - lam, fixed)
        ok = (
            np.all(x[free] >= lb[free] - 1e-12)
            and np.all(x[free] <= ub[free] + 1e-12)
            and np.all(a[s == 0] - lam <= lb[s == 0] + 1e-12)
            and np.all(a[s == 2] - lam >= ub[s == 2] - 1e-12)
        )
        if ok:
            return x
    raise AssertionError("no KKT point: infeasible instance")


def test_water_filling_equals_the_exact_qp_solution() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(1, 7))
        ub = rng.integers(1, 50, size=k).astype(float)
        lb = np.minimum(rng.uniform(0, 10, size=k), ub - 1).clip(0)
        total = float(rng.uniform(lb.sum(), ub.sum()))
        p = rng.dirichlet(np.ones(k))
        a = p * total
        x = water_fill(a, lb, ub, total)
        np.testing.assert_allclose(x, _active_set_qp(a, lb, ub, total), atol=1e-7)
        assert x.sum() == pytest.approx(total, abs=1e-7)
        # and no feasible move along the constraint lowers the objective
        obj = 0.5 * x @ x - a @ x
        for i, j in itertools.permutations(range(k), 2):
            step = min(1e-3, x[i] - lb[i], ub[j] - x[j])
            if step > 0:
                y = x.copy()
                y[i] -= step
                y[j] += step
                assert 0.5 * y @ y - a @ y >= obj - 1e-12


def test_water_filling_infeasible_bounds_and_rounding() -> None:
    with pytest.raises(ValueError, match="lower balance_ratio"):
        water_fill(np.ones(3), np.full(3, 5.0), np.full(3, 9.0), 10.0)
    b = largest_remainder(np.array([1.5, 2.5, 0.0, 3.0]), 7, np.array([5, 5, 0, 3]))
    assert b.sum() == 7 and b[2] == 0 and b[3] == 3


def test_stage_keeps_each_clusters_budget_of_its_hardest_members() -> None:
    x, _ = planted_embeddings(300, 16, 4, duplicates=0, seed=3)
    table = embedding_table(x)
    cfg = DensityPruneConfig(keep_fraction=0.5, num_clusters=4, num_neighbors=2)
    out, state, _ = run_stage(STAGE, cfg, table, tasks=3)
    assert state is not None
    kept = np.asarray(out.column("drop_reason").is_null().to_numpy(zero_copy_only=False))
    assert kept.sum() == 150  # the pool is under sample_size: exact budgets
    centroids, _ = read_embeddings(state, "centroid")
    cluster = assign(x, centroids)
    dist = centroid_distance(x, centroids, cluster)
    budgets = state.column("budget").to_numpy()
    p = state.column("p").to_numpy()
    assert p.sum() == pytest.approx(1.0)
    for j in range(4):
        members = np.flatnonzero(cluster == j)
        got = int(kept[members].sum())
        assert abs(got - budgets[j]) <= 1  # rounded budget
        if 0 < got < len(members):  # the kept ones are the farthest from the centroid
            assert dist[members][kept[members]].min() >= dist[members][~kept[members]].max()
    assert out.column("cluster").to_pylist() == cluster.tolist()
    again, _, _ = run_stage(STAGE, cfg, table, tasks=1)
    assert again.column("drop_reason").equals(out.column("drop_reason"))


def test_easy_and_random_and_bad_input() -> None:
    x, _ = planted_embeddings(120, 8, 3, duplicates=0, seed=4)
    x[5] = np.nan
    table = embedding_table(x)
    for which in ("easy", "random"):
        cfg = DensityPruneConfig(keep_fraction=0.25, num_clusters=3, which_to_keep=which)
        out, _, _ = run_stage(STAGE, cfg, table, tasks=2)
        reasons = out.column("drop_reason").to_pylist()
        assert reasons[5] == "bad_embedding"
        assert reasons.count(None) == round(0.25 * 119)
    with pytest.raises(ValidationError):
        DensityPruneConfig(keep_fraction=0.0)
    with pytest.raises(ValidationError):
        DensityPruneConfig(keep_fraction=0.5, balance_ratio=2.0)
    # more clusters than rows: k-means uses fewer, empty clusters get no budget
    small = embedding_table(planted_embeddings(6, 8, 2, duplicates=0, seed=5)[0])
    out, state, _ = run_stage(STAGE, DensityPruneConfig(keep_fraction=0.5, num_clusters=40), small)
    assert state is not None and state.num_rows == 6
    assert out.column("drop_reason").null_count == 3
