"""The rank fork server (real processes): a forked rank is the process `python -m
kiln.training.launch` would be (own session, cwd, log as stdout/stderr, exit status as
`Popen.returncode` reads), and no rank outlives its server. Trainings through it (same
losses, bitwise, as fresh interpreters) are the integration tests' local-launcher runs."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from kiln.training import rank_fork
from kiln.training.rank_fork import RANK_COMMAND, RankServer, server_for
from tests.helpers_training import running

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server() -> Iterator[RankServer]:
    """A server started by a thread that has ended since (a launch from a worker thread):
    it serves on (the kernel's parent-death signal follows the thread, not the process)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env = {k: v for k, v in env.items() if k not in rank_fork.PER_LAUNCH_ENV}
    started: list[RankServer] = []
    thread = threading.Thread(target=lambda: started.append(RankServer(env, ".")))
    thread.start()
    thread.join()
    yield started[0]
    started[0].close()


def _env(rank: int) -> dict[str, str]:
    return dict(os.environ, RANK=str(rank), PYTHONUNBUFFERED="1")


def test_a_rank_writes_to_its_log_and_exits_with_its_status(
    server: RankServer, tmp_path: Path
) -> None:
    log = tmp_path / "help.log"
    rank = server.spawn([*RANK_COMMAND, "--help"], _env(0), str(log))
    assert rank.wait(timeout=120) == 0
    assert "usage:" in log.read_text() and "--run-dir" in log.read_text()

    log = tmp_path / "bad.log"
    rank = server.spawn([*RANK_COMMAND, "--threads", "x"], _env(0), str(log))
    assert rank.wait(timeout=120) == 2  # argparse's status, its message on stderr
    assert "--config" in log.read_text()
    assert rank.poll() == 2


def test_a_rank_runs_in_its_own_session_and_folder_and_can_be_killed(
    server: RankServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)  # reading the config blocks: the rank waits there
    monkeypatch.chdir(tmp_path)
    rank = server.spawn(
        [*RANK_COMMAND, "--config", str(fifo), "--run-dir", str(tmp_path)],
        _env(1),
        str(tmp_path / "r.log"),
    )
    proc = psutil.Process(rank.pid)
    deadline = time.monotonic() + 60
    while proc.name() != "kiln-rank1":  # named once it parsed its arguments
        assert time.monotonic() < deadline, proc.name()
        time.sleep(0.05)
    assert os.getsid(rank.pid) == rank.pid  # a session of its own, as the launcher kills it
    assert proc.cwd() == str(tmp_path)
    assert proc.ppid() == server._proc.pid
    with pytest.raises(subprocess.TimeoutExpired):
        rank.wait(timeout=0.2)
    assert rank.poll() is None
    os.killpg(rank.pid, signal.SIGKILL)
    assert rank.wait(timeout=30) == -signal.SIGKILL


def test_ranks_die_with_their_server_and_a_dead_server_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in rank_fork.PER_LAUNCH_ENV}
    # a module that prints to stdout as the interpreter starts: not an answer, skipped
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("print('hello from sitecustomize', flush=True)\n")
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", str(REPO))])
    srv = RankServer(env, str(REPO))
    try:
        fifo = tmp_path / "config.fifo"
        os.mkfifo(fifo)
        rank = srv.spawn(
            [*RANK_COMMAND, "--config", str(fifo), "--run-dir", str(tmp_path)],
            _env(0),
            str(tmp_path / "r.log"),
        )
        assert running({rank.pid})
        srv._proc.kill()
        assert rank.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while running({rank.pid}):
            assert time.monotonic() < deadline, "a rank outlived its server"
            time.sleep(0.1)
        assert not srv.alive
        with pytest.raises(RuntimeError, match="rank fork server"):
            srv.spawn([*RANK_COMMAND, "--help"], _env(0), str(tmp_path / "h.log"))
    finally:
        srv.close()


def test_one_server_per_environment_and_none_when_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rank_fork, "_servers", type(rank_fork._servers)())
    base = {k: v for k, v in os.environ.items() if k not in rank_fork.PER_LAUNCH_ENV}
    base["OMP_NUM_THREADS"] = "1"
    one = server_for(dict(base, RANK="0", MASTER_PORT="1234"))
    try:
        assert server_for(dict(base, RANK="1", MASTER_PORT="999", WORLD_SIZE="3")) is one
        assert one is not None and "RANK" not in one.env and "MASTER_PORT" not in one.env
        # kiln reads its own variables as it runs, not as it is imported: the same server
        assert server_for(dict(base, KILN_FAULT_SIGKILL_AFTER_STEP="5")) is one
        two = server_for(dict(base, OMP_NUM_THREADS="2"))  # read as torch loads: its own
        assert two is not None and two is not one
        three = server_for(dict(base, OMP_NUM_THREADS="3"))
        assert three is not None
        # two idle servers are kept: the least recently used one ended
        assert one._proc.poll() is not None
        assert two._proc.poll() is None and three._proc.poll() is None
        assert server_for(dict(base, KILN_FORK_RANKS="0")) is None
    finally:
        rank_fork._close_all()
