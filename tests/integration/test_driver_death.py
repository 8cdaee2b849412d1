"""A SIGKILLed `kiln train` stops its ranks, and `kiln runs` shows the run as dead.

Real processes: `kiln train` on a tiny recipe runs as a subprocess (launcher local: rank
subprocesses; launcher ray: a private embedded Ray and two Ray Train workers), is SIGKILLed
after its first checkpoint, and then no rank of that run may still be alive a few seconds
later, nor may more than the checkpoint in flight at the kill appear. Before the fix the
Ray Train workers went on for several steps and checkpoints until Ray noticed the job was
gone, and `status.json` said `running` for good.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from kiln.models.checkpoint_index import complete_checkpoints
from kiln.platform.runs import list_runs
from kiln.training.launch import ATTEMPTS_FILE
from tests.helpers_training import TINY_MODEL, local_ranks, running

REPO = Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 20.0


def _recipe(tmp_path: Path, dataset: str, launcher: str) -> Path:
    spec = {
        "kind": "train",
        "name": f"killed-{launcher}",
        "run_dir": str(tmp_path / "run"),
        "resources": {"workers": 2, "launcher": launcher},
        "ray": {"num_cpus": 2},
        "data": {"dataset": dataset, "batch_size": 4, "num_workers": 1, "shuffle_buffer": 8},
        "model": TINY_MODEL,
        "zero": {"stage": 2},
        # a checkpoint every step: ranks that outlive their driver would show at once
        "checkpoint": {"every_steps": 1, "keep_last": 1000},
        "max_steps": 1000,
        "log_every": 1,
        "seed": 3,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _rank_pids(run: Path, launcher: str, driver: psutil.Process) -> set[int]:
    if launcher == "local":
        return local_ranks(driver)
    attempts = list((run / "ray_train").rglob(ATTEMPTS_FILE))
    assert attempts, "the Ray launcher recorded no attempt"
    record = json.loads(attempts[0].read_text().splitlines()[-1])
    return {int(w["pid"]) for w in record["workers"]}


def _worker_stderr(driver: int, worker: int) -> str:
    """What Ray logged of `worker`'s stderr in the session the `driver` process started
    (Ray names a session after the pid that started it)."""
    root = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
    logs = [
        p for s in root.glob(f"session_*_{driver}") for p in s.glob(f"logs/worker-*-{worker}.err")
    ]
    assert logs, f"no Ray log of worker {worker} under {root}/session_*_{driver}"
    return "".join(p.read_text(errors="replace") for p in logs)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "ray"])
def test_killed_driver_stops_its_ranks(launcher: str, short_dataset: str, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, short_dataset, launcher)
    run = tmp_path / "run"
    log = open(tmp_path / "kiln-train.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln", "-v", "train", str(recipe)],  # -v: Ray's lines too
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    driver = psutil.Process(proc.pid)
    spawned: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 400
        while not complete_checkpoints(run):
            assert proc.poll() is None, (tmp_path / "kiln-train.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint in 400 s"
            time.sleep(0.1)
        spawned = driver.children(recursive=True)
        ranks = _rank_pids(run, launcher, driver)
        assert len(ranks) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        at_kill = set(complete_checkpoints(run))

        deadline = time.monotonic() + GONE_WITHIN_S
        while running(ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not running(ranks), f"ranks still running {GONE_WITHIN_S}s after the kill"
        after = set(complete_checkpoints(run))
        assert len(after - at_kill) <= 1  # at most the save in flight at the kill
        time.sleep(3)
        assert set(complete_checkpoints(run)) == after

        if launcher == "ray":  # they stopped because they saw their driver die
            for pid in ranks:
                assert f"its driver (pid {proc.pid}" in _worker_stderr(proc.pid, pid)
            # -v: the workers' lines reached the terminal, as Ray prints them
            assert "(RayTrainWorker pid=" in (tmp_path / "kiln-train.log").read_text()

        [info] = list_runs(run)
        assert info.state == "dead", info
        assert info.error is not None and f"pid {proc.pid}" in info.error
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        # Ray's own agents linger a minute or two after their raylet died: end the ones
        # this test started, by pid
        for p in spawned:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
