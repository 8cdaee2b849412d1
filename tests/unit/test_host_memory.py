"""`host_memory: reuse`: a rank's large freed blocks are reused without page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kiln.training.config import TrainConfig

# Allocates, touches and frees a 64 MiB block (over glibc's largest mmap threshold) five
# times and prints the minor page faults of the last four rounds: with glibc's defaults each
# round maps fresh zeroed pages (16k faults); kept for reuse, the first round's block is
# reused. (torch's 64-byte-aligned requests may grow the heap for a few rounds more, until
# freed blocks have merged into one that fits: the peak-memory cost README states.)
_ROUNDS = """
import resource, sys
from kiln.training.host_memory import keep_freed_memory
if sys.argv[1] == "reuse":
    assert keep_freed_memory()
def round_():
    block = bytearray(64 * 2**20)
    block[::4096] = bytes(len(block) // 4096)  # touch every page
    del block
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reused_blocks_are_not_faulted_in_again() -> None:
    pages = 4 * 64 * 2**20 // 4096  # four rounds of 64 MiB in 4 KiB pages
    assert _faults("release") > pages // 2  # glibc's defaults: fresh pages every round
    assert _faults("reuse") < pages // 50


def test_reuse_is_the_default_and_release_is_glibcs() -> None:
    cfg = TrainConfig.model_validate({"data": {"dataset": "/d"}})
    assert cfg.host_memory == "reuse"
    with pytest.raises(ValueError, match="host_memory"):
        TrainConfig.model_validate({"data": {"dataset": "/d"}, "host_memory": "keep"})
