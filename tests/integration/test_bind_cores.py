"""`resources.bind_cores` in a real run: the local launcher's ranks bind themselves and
their loader workers, say where, and train exactly the losses of an unbound run (binding
moves threads, not work). `data.worker_processes`: loader workers in the ranks' processes
or in processes of their own train the same losses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kiln.resource_fit import usable_cpus
from kiln.training import train
from kiln.training.cpu_binding import allowed_cores, loader_in_rank
from tests.helpers_training import short_run_config as config

pytestmark = pytest.mark.slow


@pytest.mark.skipif(allowed_cores() is None, reason="no sched_setaffinity here")
def test_bound_ranks_train_the_unbound_runs_losses(
    short_dataset: str,
    short_reference: list[float],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    summary = train(
        config(short_dataset), str(tmp_path / "run"), num_workers=2, launcher="local",
        bind_cores=True,
    )  # fmt: skip
    assert summary.losses == short_reference  # exact
    out = capfd.readouterr().out
    cores = list(allowed_cores() or ())
    # the loader's place is decided on the node's cores, not the bound rank's one
    _, why = loader_in_rank("auto", 1, 1, {"LOCAL_WORLD_SIZE": "2"}, cores=len(cores))
    assert (why is None and "[kiln] loader: " not in out) or f"[kiln] {why}" in out, out
    if len(cores) < 2:
        assert "bind_cores: 2 local rank(s) x 1 thread(s) need 2 cores" in out
        return
    line = re.search(r"\[kiln\] bind_cores: 2 local rank\(s\) on core (\d+); core (\d+), (.*)", out)
    assert line is not None, out
    assert [int(line[1]), int(line[2])] == cores[:2]
    if len(cores) == 2:  # no core left over: the loader workers may use both
        assert line[3].startswith("their loader workers on cores ")
        assert line[3].endswith("(no core left over: all of them)")
    else:
        assert "left over" not in line[3]


def test_loader_workers_in_the_ranks_or_in_processes_train_the_same_losses(
    short_dataset: str,
    short_reference: list[float],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The reference ran with ``worker_processes: auto``; this run takes the other side of
    what auto chose on this machine (in the ranks on 2 cores, processes on more)."""
    cores = usable_cpus()
    auto_in_rank, line = loader_in_rank("auto", 1, 1, {"LOCAL_WORLD_SIZE": "2"}, cores=cores)
    cfg = config(short_dataset)
    cfg.data.worker_processes = "always" if auto_in_rank else "never"
    summary = train(cfg, str(tmp_path / "run"), num_workers=2, launcher="local")
    assert summary.losses == short_reference  # exact
    assert "[kiln] loader: " not in capfd.readouterr().out  # only auto says where they run
    assert auto_in_rank == (cores <= 2) and (line is not None) == auto_in_rank
