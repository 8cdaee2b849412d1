"""A local training run listens on loopback only: torch's rendezvous store and gloo's
sockets of every rank (issue: torch's TCPStore listens on all interfaces by default)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import psutil
import pytest

from kiln.training import train
from tests.helpers_datasets import write_tiny_dataset
from tests.integration.test_resume import tiny_config

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.mark.slow
def test_local_ranks_listen_on_loopback_only(tmp_path: Path) -> None:
    dataset = str(write_tiny_dataset(tmp_path / "ds", num_samples=64))
    cfg = tiny_config(dataset, 2).model_copy(update={"max_steps": 16})
    me = psutil.Process(os.getpid())
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            pids = {p.pid for p in me.children(recursive=True)}
            for conn in psutil.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and conn.pid in pids and conn.laddr:
                    seen.add(conn.laddr.ip)
            done.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        train(cfg, str(tmp_path / "run"), num_workers=2, launcher="local")
    finally:
        done.set()
        watcher.join(timeout=5)
    assert seen, "no rank listened on anything: the check would be vacuous"
    assert seen <= LOOPBACK, f"a rank listens beyond loopback: {seen}"
