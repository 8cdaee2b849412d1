"""`resources.bind_cores` in a real run: the local launcher's ranks bind themselves and
their loader workers, say where, and train exactly the losses of an unbound run (binding
moves threads, not work)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kiln.training import train
from kiln.training.cpu_binding import allowed_cores
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
