"""SIGTERM ends a kiln command as Ctrl-C does.

`kill`, `docker stop`, a Kubernetes pod's end and Slurm's `scancel` send SIGTERM. Python's
default for it ends the process at once: a run's ranks were killed with it and the run read
as dead. With `install`, SIGTERM goes to whatever handles SIGINT (Python's
KeyboardInterrupt, or kiln's abort of a Ray Train run), so ranks and workers are stopped
and the run is recorded `interrupted` with how to resume; `terminated` then tells the CLI
to say SIGTERM and exit 143.

`ray.init` installs Ray's own SIGTERM handler in the driver (it prints a stack dump and
aborts the process): `reclaim` after it puts kiln's back.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["install", "reclaim", "terminated"]

_installed = False
_terminated = False


def _on_sigterm(signum: int, frame: Any) -> None:
    global _terminated
    _terminated = True
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signal.SIGINT, frame)
    else:  # Python's own, or SIGINT ignored (a background job of a script): still stop
        raise KeyboardInterrupt


def install() -> None:
    """Route SIGTERM to the SIGINT handling in this process (main thread only: elsewhere
    Python cannot install handlers, and nothing is changed)."""
    global _installed
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
        _installed = True


def reclaim() -> None:
    """Put kiln's SIGTERM handler back after a library replaced it (`ray.init`), if
    `install` had put it there."""
    if _installed:
        install()


def terminated() -> bool:
    """Whether SIGTERM started the interruption being handled."""
    return _terminated
