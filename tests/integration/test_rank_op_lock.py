"""A rank loads DeepSpeed's CPU collectives op under kiln's build lock.

The bug this catches (CI, two test lanes training at once): a rank let DeepSpeed load the
op itself, and torch takes its `lock` file on every load, not only to compile. Another
kiln run's launcher, holding kiln's build lock, took that file for a killed build's
leftover and removed it, and the rank crashed releasing it (FileNotFoundError). Now
`init_distributed` loads the op under kiln's lock first: while another process holds that
lock, a starting rank waits for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.training.engine import op_build_lock, set_runtime_env
from tests.helpers_training import one_rank_env

pytestmark = pytest.mark.slow

RANK = """
import sys
from deepspeed.accelerator import get_accelerator
from kiln.training.engine import init_distributed
print(get_accelerator().create_op_builder("ShareMemCommBuilder").name, flush=True)
sys.stdin.readline()  # the test holds kiln's lock on that op's folder now
init_distributed()
print("initialized", flush=True)
"""


def test_a_starting_rank_waits_for_kilns_op_build_lock() -> None:
    env = one_rank_env(set_runtime_env(dict(os.environ, DS_ACCELERATOR="cpu")))
    rank = subprocess.Popen(
        [sys.executable, "-c", RANK],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert rank.stdin is not None and rank.stdout is not None
    try:
        op_name = rank.stdout.readline().strip()
        assert op_name, "the rank process printed no op name"
        cache = Path(env["TORCH_EXTENSIONS_DIR"]) / op_name
        with op_build_lock(cache):
            rank.stdin.write("go\n")
            rank.stdin.flush()
            time.sleep(4.0)  # a rank not waiting for the lock is initialized well before
            assert rank.poll() is None, "the rank went on while kiln's build lock was held"
        out, _ = rank.communicate(timeout=300)
    finally:
        if rank.poll() is None:
            rank.kill()
    assert rank.returncode == 0, out
    assert "initialized" in out
