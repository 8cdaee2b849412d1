"""The step's logged means over ranks (`kiln.training.loop._start_global_means`) with real
gloo: the all-reduce starts without waiting for the other ranks (so it runs beside the
step's backward) and its result is the mean over micro-steps and ranks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests.helpers_training import gloo_group, spawn_gloo_ranks

pytestmark = pytest.mark.slow

LATE_S = 1.0


def _worker(rank: int, port: int, out: str) -> None:
    from kiln.training.loop import _start_global_means

    with gloo_group(rank, 2, port):
        if rank == 1:
            time.sleep(LATE_S)  # rank 0 must not wait for this rank to start its means
        logs = [{"loss": torch.tensor(float(rank + m))} for m in range(2)]
        t = time.perf_counter()
        means = _start_global_means(logs, 2)
        started_s = time.perf_counter() - t
        result = means()
        waited_s = time.perf_counter() - t
        if rank == 0:
            torch.save({"result": result, "started_s": started_s, "waited_s": waited_s}, out)


def test_the_means_start_without_waiting_and_average_ranks_and_micro_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got = spawn_gloo_ranks(_worker, 2, tmp_path, monkeypatch)
    # rank 0 logged 0 and 1, rank 1 logged 1 and 2: the mean of all four
    assert got["result"] == {"loss": 1.0}
    assert got["started_s"] < LATE_S / 2 < got["waited_s"]
