"""A Ray Train group whose ranks cannot all see the driver's run dir stops at once, every
rank with the same one-line error naming the ranks, their nodes and the fix (before the
check, those ranks trained into a folder of their own and the driver waited out its start
timeout: 10 minutes)."""

from __future__ import annotations

from pathlib import Path

from kiln.training.launch import _run_dir_unseen


def _worker(rank: int, ip: str, sees: bool) -> dict[str, object]:
    return {
        "rank": rank,
        "node_id": f"n-{ip}",
        "node_ip": ip,
        "pid": 100 + rank,
        "sees_run_dir": sees,
    }


def test_a_run_dir_every_rank_sees_passes(tmp_path: Path) -> None:
    workers = [_worker(0, "10.0.0.1", True), _worker(1, "10.0.0.2", True)]
    assert _run_dir_unseen(tmp_path, workers, staged=False) is None
    assert _run_dir_unseen(tmp_path, workers, staged=True) is None


def test_ranks_that_cannot_see_it_are_named_with_their_nodes_and_the_fix(tmp_path: Path) -> None:
    workers = [
        _worker(0, "10.0.0.1", True),
        _worker(1, "10.0.0.2", False),
        _worker(2, "10.0.0.2", False),
        _worker(3, "10.0.0.3", False),
    ]
    local = _run_dir_unseen(tmp_path, workers, staged=False)
    assert local is not None and "\n" not in local
    assert local.startswith("Ray Train rank(s) 1, 2, 3 on node(s) 10.0.0.2, 10.0.0.3 ")
    assert f"cannot see the run dir {tmp_path}" in local
    assert "filesystem every node mounts" in local
    staged = _run_dir_unseen(tmp_path, workers, staged=True)
    assert staged is not None and "KILN_STAGING_DIR" in staged and "torchrun" in staged
