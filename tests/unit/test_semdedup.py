"""SemDeDup: the reference rule, checked against a brute-force loop on the same clusters."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from kiln.data_curation.clustering import assign, uid_rank_hash
from kiln.data_curation.embeddings import read_embeddings
from kiln.data_curation.stages.semdedup import (
    SemDedupConfig,
    SemDedupStage,
    max_similarity_to_earlier,
)
from tests.helpers_pruning import embedding_table, planted_embeddings, run_stage

STAGE = SemDedupStage()


def _brute_force(x: np.ndarray, uids: list[str], cluster: np.ndarray, centroids: np.ndarray,
                 eps: float, which: str, seed: int) -> set[str]:  # fmt: skip
    """The SemDeDup rule written as plainly as possible, in float64 Python loops."""
    removed: set[str] = set()
    hashes = uid_rank_hash(pa.array(uids), seed)
    for c in sorted(set(cluster.tolist())):
        members = sorted((i for i in range(len(uids)) if cluster[i] == c), key=lambda i: uids[i])
        dist = {i: 1.0 - float(np.dot(x[i].astype(float), centroids[c].astype(float)))
                for i in members}  # fmt: skip
        if which == "hard":
            ranked = sorted(members, key=lambda i: -dist[i])  # stable: uid order on ties
        elif which == "easy":
            ranked = sorted(members, key=lambda i: dist[i])
        else:
            ranked = sorted(members, key=lambda i: int(hashes[i]))
        for j_pos, j in enumerate(ranked):
            best = max((float(np.dot(x[i].astype(float), x[j].astype(float)))
                        for i in ranked[:j_pos]), default=0.0)  # fmt: skip
            if best > 1.0 - eps:
                removed.add(uids[j])
    return removed


@pytest.mark.parametrize("which", ["hard", "easy", "random"])
@pytest.mark.parametrize("eps", [0.02, 0.3])
def test_removals_equal_a_brute_force_of_the_rule(which: str, eps: float) -> None:
    x, planted = planted_embeddings(240, 32, 4, duplicates=30, seed=1)
    table = embedding_table(x)
    cfg = SemDedupConfig(num_clusters=4, eps=eps, which_to_keep=which, seed=3, block_rows=7)
    out, state, _ = run_stage(STAGE, cfg, table, tasks=3)
    assert state is not None
    centroids, _ = read_embeddings(state, "centroid")
    cluster = assign(x, centroids)
    uids = table.column("uid").to_pylist()
    expected = _brute_force(x, uids, cluster, centroids, eps, which, seed=3)
    got = {u for u, r in zip(uids, out.column("drop_reason").to_pylist(), strict=True) if r}
    assert got == expected
    assert set(out.column("drop_reason").drop_null().to_pylist()) <= {"semantic_duplicate"}
    if eps == 0.02:  # each planted pair loses exactly one of its two rows
        assert len(got) == len(planted)


def test_blocks_and_tasks_do_not_change_the_result() -> None:
    x, _ = planted_embeddings(200, 8, 3, duplicates=25, seed=2)
    table = embedding_table(x)
    base = SemDedupConfig(num_clusters=3, eps=0.05)
    ref, state, _ = run_stage(STAGE, base, table)
    split, state2, _ = run_stage(STAGE, base.model_copy(update={"block_rows": 5}), table, tasks=4)
    assert state is not None and state2 is not None and state.equals(state2)
    assert ref.column("drop_reason").equals(split.column("drop_reason"))
    m_whole = max_similarity_to_earlier(x, block_rows=10_000)
    m_block = max_similarity_to_earlier(x, block_rows=3)
    np.testing.assert_array_equal(m_whole, m_block)
    ref_m = np.triu(x @ x.T, 1).max(axis=0)  # the reference's expression
    np.testing.assert_allclose(m_whole, ref_m, atol=1e-6)


def test_eps_list_reports_kept_fraction_per_eps_and_first_decides() -> None:
    x, planted = planted_embeddings(150, 32, 2, duplicates=20, seed=4)
    cfg = SemDedupConfig(num_clusters=2, eps=[0.01, 0.5])
    out, state, summaries = run_stage(STAGE, cfg, embedding_table(x))
    report = STAGE.report(summaries, cfg, state)
    dropped = out.column("drop_reason").drop_null()
    assert len(dropped) == len(planted)  # eps 0.01 decides: the planted copies only
    kept = report["kept_fraction_by_eps"]
    assert kept["0.01"] == pytest.approx(1 - len(planted) / 150)
    assert kept["0.5"] < kept["0.01"]
    assert report["clusters"] == 2 and report["rows_clustered"] == 150


def test_bad_embeddings_are_counted_drops_and_bad_settings_are_errors() -> None:
    x, _ = planted_embeddings(40, 6, 2, duplicates=4, seed=5)
    x[3] = np.nan
    x[7] = 0.0
    out, _, _ = run_stage(STAGE, SemDedupConfig(num_clusters=2), embedding_table(x))
    reasons = out.column("drop_reason").to_pylist()
    assert reasons[3] == reasons[7] == "bad_embedding"
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValidationError, match="outside"):
            SemDedupConfig(eps=bad)
    with pytest.raises(ValidationError, match="outside"):
        SemDedupConfig(eps=[0.05, 2.0])
    with pytest.raises(ValueError, match="6-dimensional vectors, expected 8"):
        run_stage(STAGE, SemDedupConfig(dim=8), embedding_table(x))
    with pytest.raises(ValueError, match="run the embed stage"):
        run_stage(STAGE, SemDedupConfig(column="text_embedding"), embedding_table(x))
    with pytest.raises(ValueError, match="nothing to cluster"):
        run_stage(STAGE, SemDedupConfig(), embedding_table(np.full((5, 6), np.nan, np.float32)))


def test_more_clusters_than_rows_and_empty_clusters() -> None:
    x, _ = planted_embeddings(12, 6, 2, duplicates=2, seed=6)
    out, state, summaries = run_stage(
        STAGE, SemDedupConfig(num_clusters=50, eps=0.01), embedding_table(x)
    )
    assert state is not None and state.num_rows == 12  # clamped to the rows there are
    assert out.column("drop_reason").null_count >= 10
    report = STAGE.report(summaries, SemDedupConfig(num_clusters=50, eps=0.01), state)
    assert report["clusters_with_rows"] <= 12
