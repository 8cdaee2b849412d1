"""`host_memory: reuse`: a rank's large freed blocks are reused without page faults."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from kiln.training.config import TrainConfig
from kiln.training.host_memory import holds_on_this_thread, process_env

# Allocates, touches and frees a 64 MiB block (over glibc's largest mmap threshold) five
# times and prints the minor page faults of the last four rounds: with glibc's defaults each
# round maps fresh zeroed pages (16k faults); kept for reuse, the first round's block is
# reused. (torch's 64-byte-aligned requests may grow the heap for a few rounds more, until
# freed blocks have merged into one that fits: the peak-memory cost README states.)
# With "thread", all of it (the setting included) runs on a thread other than the main one,
# as a Ray Train worker's training function does.
_ROUNDS = """
import resource, sys, threading
from kiln.training.host_memory import keep_freed_memory
def round_():
    block = bytearray(64 * 2**20)
    block[::4096] = bytes(len(block) // 4096)  # touch every page
    del block
def rounds():
    if sys.argv[1] == "reuse":
        assert keep_freed_memory()
    round_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        round_()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
if sys.argv[2] == "thread":
    thread = threading.Thread(target=rounds)
    thread.start()
    thread.join()
else:
    rounds()
"""


def _faults(mode: str, where: str = "main", env: dict[str, str] | None = None) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _ROUNDS, mode, where],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reused_blocks_are_not_faulted_in_again() -> None:
    pages = 4 * 64 * 2**20 // 4096  # four rounds of 64 MiB in 4 KiB pages
    assert _faults("release") > pages // 2  # glibc's defaults: fresh pages every round
    assert _faults("reuse") < pages // 50


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_holds_off_the_main_thread_with_the_process_env() -> None:
    """Ray Train's case: a thread's own arena maps and faults large blocks anew whatever
    mallopt says; the env `process_env` gives the process keeps every thread on the main
    arena, where the blocks are reused."""
    pages = 4 * 64 * 2**20 // 4096
    assert _faults("reuse", "thread") > pages // 2
    assert process_env("reuse") and not process_env("release")
    assert _faults("reuse", "thread", process_env("reuse")) < pages // 50


def test_holds_on_this_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the training loop checks before it warns that the setting does not hold."""
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.append(holds_on_this_thread()))
    thread.start()
    thread.join()
    assert holds_on_this_thread() and seen == [False]
    monkeypatch.setenv("MALLOC_ARENA_MAX", "1")
    thread = threading.Thread(target=lambda: seen.append(holds_on_this_thread()))
    thread.start()
    thread.join()
    assert seen == [False, True]


def test_reuse_is_the_default_and_release_is_glibcs() -> None:
    cfg = TrainConfig.model_validate({"data": {"dataset": "/d"}})
    assert cfg.host_memory == "reuse"
    with pytest.raises(ValueError, match="host_memory"):
        TrainConfig.model_validate({"data": {"dataset": "/d"}, "host_memory": "keep"})
