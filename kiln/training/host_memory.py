"""How a training rank's host (CPU) memory allocator treats large blocks it frees.

glibc's malloc serves every block over its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and gives it back to the OS on ``free``. A training step allocates and frees
blocks far larger than that on every step: autograd's gradients, ZeRO's flattened gradient
partition, the optimizer's temporaries (252 MB each for ViT-S/32's 63M parameters). Each
new mapping is then faulted in page by page and zeroed by the kernel, every step, which is
where much of a CPU step's time went: ViT-S/32, ZeRO-2, one rank, batch 32, one thread,
the engine's step took 9.8 s with glibc's defaults and 8.2 s with freed memory kept for
reuse, and `kiln train` went from 3.12 to 3.41 samples/s (2 ranks: 5.43 to 5.55), on this
project's 2-core VM, where page faults cost more than on bare metal
(`benchmarks/bench_train_overhead.py`).

``reuse`` (``host_memory: reuse``, the default) asks glibc, through ``mallopt``, never to
serve a block by ``mmap`` and never to trim the heap, so memory a step frees is there for
the next step without a fault: PyTorch's CPU performance guide gets the same from
jemalloc or tcmalloc, which kiln's dependencies do not ship. The cost: a rank's resident
memory stays at its peak instead of shrinking between steps, and the peak grows a little
(freed blocks are reused once they have merged into ones big enough for torch's aligned
requests): 3.57 -> 4.05 GB for that ViT-S/32 rank. Values are unchanged (only
where blocks live changes). ``release`` keeps glibc's defaults. Outside glibc (macOS, musl)
there is nothing to set and both settings mean the system's allocator.

A thread other than the main one allocates from an arena of its own, whose heaps glibc
caps at 64 MiB and gives back (or maps) regardless of those settings: blocks of 40 MiB
and more, freed there, are faulted in again on every reuse (`tests/unit/test_host_memory`:
every page of a 64-MiB block, every round). Ray Train runs the training function on such a
thread, so its ranks start with ``MALLOC_ARENA_MAX=1`` (`process_env`): every thread then
allocates from the main arena, where the settings hold. That took `kiln train --launcher
ray` at ViT-S/32, 2 ranks, from 5.8-6.8 s steps to 4.5-5.0 s. Local and torchrun ranks
train on their main thread.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Literal

__all__ = ["HostMemory", "holds_on_this_thread", "keep_freed_memory", "process_env"]

HostMemory = Literal["reuse", "release"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make this process's glibc malloc keep the memory it frees for reuse: no ``mmap`` for
    large blocks, no trimming of the heap. Applies to blocks allocated from now on; child
    processes forked later (DataLoader workers) inherit it. Returns whether it was set
    (False where the C library is not glibc)."""
    libc = ctypes.CDLL(None)  # this process's own symbols: its C library among them
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; trimming off first, so nothing mapped is given back
    return bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX)) and bool(mallopt(_M_MMAP_MAX, 0))


def process_env(mode: HostMemory) -> dict[str, str]:
    """Environment for a process whose training runs off its main thread (a Ray Train
    worker): with ``reuse``, one malloc arena for every thread, so `keep_freed_memory`'s
    settings hold there too (module doc). glibc reads it when the process starts."""
    return {"MALLOC_ARENA_MAX": "1"} if mode == "reuse" else {}


def holds_on_this_thread() -> bool:
    """Whether `keep_freed_memory`'s settings govern this thread's large blocks: on the
    main thread, or on any with ``MALLOC_ARENA_MAX=1`` in the process's environment."""
    return threading.current_thread() is threading.main_thread() or all(
        os.environ.get(k) == v for k, v in process_env("reuse").items()
    )
