"""A process watching its driver exits when the driver dies (real processes)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from kiln.liveness import DRIVER_GONE_EXIT, alive, identity

REPO = Path(__file__).resolve().parents[2]

WATCHER = """
import json, sys, time
from kiln.liveness import watch
assert watch(json.loads(sys.argv[1]), "test watcher")
print("watching", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_a_watcher_exits_soon_after_its_driver_dies(reaped: bool) -> None:
    """Also while the dead driver is a zombie its parent has not reaped yet: it has exited,
    though kill(pid, 0) still finds it."""
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCHER, json.dumps(identity(driver.pid))],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None and watcher.stdout.readline() == "watching\n"
        time.sleep(0.5)
        assert watcher.poll() is None  # the driver lives: the watcher goes on
        driver.kill()
        if reaped:
            driver.wait()
        else:
            deadline = time.monotonic() + 30
            while psutil.Process(driver.pid).status() != psutil.STATUS_ZOMBIE:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert alive(identity(driver.pid)) is False
        assert watcher.wait(timeout=30) == DRIVER_GONE_EXIT
        assert watcher.stderr is not None
        assert f"its driver (pid {driver.pid}" in watcher.stderr.read()
    finally:
        for p in (driver, watcher):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_driver_on_another_host_is_not_watched() -> None:
    from kiln.liveness import watch

    assert watch({"pid": 1, "host": "elsewhere.invalid", "start": None}, "x") is False
