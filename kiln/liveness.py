"""Is a job's driver process still alive, and stop this process when it is not.

A driver (the `kiln train` / `kiln curate` process) is identified by pid, host and the
kernel's start time of that pid, so a pid the kernel reused for another process does not
count as the driver. Two users:

- training ranks (Ray Train workers) `watch` their driver and exit when it is gone: a
  SIGKILLed `kiln train` otherwise leaves its ranks training and checkpointing until Ray
  notices that the job is gone;
- `kiln runs` (`kiln.platform.runs`) tells a dead `running` run from a live one.

`die_with_parent` is the other direction, for a process's own children: the kernel kills
them when it dies (local training ranks, the rank fork server, curation pool workers).

Only a process on this host can be checked by pid; elsewhere `alive` says it cannot tell
(None) and callers use the run's heartbeat instead. Linux reads the start time from
/proc; other systems compare the pid only. Imports nothing heavy (`kiln runs` uses it).

A watcher waits on a pidfd where the kernel has them (Linux 5.3+): it wakes the moment the
driver exits, where polling every quarter second let a tiny model's rank finish another
step and checkpoint or two before it noticed.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Any

__all__ = ["DRIVER_GONE_EXIT", "alive", "die_with_parent", "identity", "watch"]

#: Exit status of a process that stopped because its driver died (EX_TEMPFAIL).
DRIVER_GONE_EXIT = 75
_WATCH_EVERY_S = 0.25


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of `pid` from /proc, None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    try:
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (IndexError, ValueError):
        return None


def _start_ticks(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if unknown."""
    stat = _stat(pid)
    return None if stat is None else stat[1]


def identity(pid: int | None = None) -> dict[str, Any]:
    """{"pid", "host", "start"} of `pid` (default: this process), as `alive` checks it."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "host": socket.gethostname(), "start": _start_ticks(pid)}


def alive(ident: dict[str, Any]) -> bool | None:
    """Whether the process `ident` (from `identity`) still runs; None when it ran on
    another host (or `ident` is not a process identity), where no pid can be checked."""
    pid = ident.get("pid")
    if not isinstance(pid, int) or ident.get("host") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    stat = _stat(pid)
    if stat is None:
        return True  # no /proc: the pid is all there is to compare
    state, start = stat
    # a zombie has exited, though its pid stays until its parent reaps it
    return state != "Z" and ident.get("start") in (None, start)


def _pidfd(ident: dict[str, Any]) -> int | None:
    """A pidfd of the process `ident`, None where the kernel or Python has none. Opened
    before `alive` looks again, so the fd cannot refer to a later process that reused
    the pid; when the process is already gone, the fd is readable at once."""
    try:
        fd = os.pidfd_open(ident["pid"])
    except (AttributeError, OSError):  # no pidfd_open, or the process is gone
        return None
    if not alive(ident):
        os.close(fd)
        return None
    return fd


def watch(ident: dict[str, Any], what: str, every_s: float = _WATCH_EVERY_S) -> bool:
    """Exit this process (status `DRIVER_GONE_EXIT`) soon after the process `ident` ends,
    saying so on stderr as ``[kiln] {what} ...``. Returns False (and watches nothing) when
    that process runs on another host."""
    if alive(ident) is None:
        return False
    pidfd = _pidfd(ident)

    def run() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])  # readable once the process has exited
        else:
            while alive(ident):
                time.sleep(every_s)
        with contextlib.suppress(Exception):
            sys.stderr.write(
                f"[kiln] {what}: its driver (pid {ident['pid']} on {ident['host']}) is gone; "
                "stopping (resume the run with `kiln resume RUN_DIR`)\n"
            )
            sys.stderr.flush()
        os._exit(DRIVER_GONE_EXIT)

    threading.Thread(target=run, name="kiln-driver-watch", daemon=True).start()
    return True


def die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when the thread that started it ends (Linux:
    PR_SET_PDEATHSIG; elsewhere nothing). `parent`: exit at once when this process's
    parent is no longer that pid (it died before the request took effect)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:
        os._exit(1)
