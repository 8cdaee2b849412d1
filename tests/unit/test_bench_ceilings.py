"""`bench_train_overhead.ceilings`: the most a trainer that loads its data on the same
cores could reach over the pure step (the figure that says whether its goal is reachable)."""

from __future__ import annotations

import pytest

from benchmarks.bench_train_overhead import ceilings


def test_ranks_that_fill_the_cores_pay_the_loader_cpu_out_of_the_step():
    # 2 ranks on 2 cores: 2,000 samples/s at 1 ms of CPU a sample; the loader 0.25 ms more
    pure = {"samples_per_s": 2000.0, "cpu_ms_per_sample": 1.0}
    ddp = {"samples_per_s": 1400.0, "cpu_ms_per_sample": 1.2}
    out = ceilings(pure, ddp, loader_ms=0.25, cores=2)
    assert out["no_sync_cost"] == pytest.approx(1.0 / 1.25, abs=1e-3)  # 1,600 of 2,000
    # DDP's waits leave idle CPU the loader may fill: 2,000 / 1.45 = 1,379 < 1,400
    assert out["ddp_sync"] == pytest.approx(2000 / 1.45 / 2000, abs=1e-3)
    assert out["loader_ms_per_sample"] == 0.25 and out["cores"] == 2


def test_a_spare_core_leaves_the_step_rate_as_the_ceiling():
    # 1 rank on 2 cores: the loader fits on the second core, so the step's rate bounds it
    pure = {"samples_per_s": 1000.0, "cpu_ms_per_sample": 1.0}
    out = ceilings(pure, None, loader_ms=0.5, cores=2)
    assert out["no_sync_cost"] == 1.0
    assert "ddp_sync" not in out
