"""End a command's process as soon as its work is done, without the interpreter's teardown.

A Python process that has imported torch, DeepSpeed and Ray spends 1.3-1.5 s of CPU after
its last line tearing itself down (measured on this project's 2-core machine): the
interpreter's final garbage collections over every module's objects, then torch
unregistering its operators one by one. Nobody sees anything of it but the wait: a
`kiln` command returns to the prompt that much later, and each training rank makes its
launcher wait that much longer for its exit status at the end of every run and before
every restart.

`exit_now` does what that shutdown does that anyone can observe, in the same order
(CPython's ``Py_FinalizeEx``), and then ends the process with ``os._exit``:

- waits for the threads that are not daemons (a normal exit waits for them too);
- runs the ``atexit`` handlers: logging's flush and close, Ray's shutdown, multiprocessing's
  stop of daemon children (DataLoader workers), ``weakref.finalize`` callbacks;
- flushes Python's ``sys.stdout`` / ``sys.stderr`` and the C library's stdio buffers.

What it skips is freeing memory the kernel takes back at once, and the finalizers of
objects still alive at exit; a file kiln writes is closed (or committed, atomically) where
it is written, never by that teardown. Instagram's servers skip it the same way
(``atexit.register(os._exit, 0)``).

For entry points only (``python -m kiln``, the `kiln` script, a training rank's
``__main__``): a library must leave the exit of the program that imported it alone.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

__all__ = ["exit_now"]


def exit_now(status: int | str | None = 0, last: Callable[[], None] | None = None) -> NoReturn:
    """Exit with `status` as ``sys.exit(status)`` would (None: 0; a string is printed to
    stderr and exits 1), after the observable part of interpreter shutdown (module doc).
    `last`: called after all of that, right before the process ends (its errors ignored)."""
    code = 0
    if isinstance(status, int):
        code = status
    elif status is not None:
        print(status, file=sys.stderr)
        code = 1
    try:
        main = threading.main_thread()
        for thread in threading.enumerate():
            if thread is not main and not thread.daemon:
                thread.join()
        # CPython's own hook for running the handlers a normal exit runs (it reports an
        # exception a handler raises, as a normal exit does, and goes on with the others)
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(Exception):  # C and C++ code's buffered printf output
            ctypes.CDLL(None).fflush(None)
    finally:
        if last is not None:
            with contextlib.suppress(Exception):
                last()
        os._exit(code & 0xFF)  # the status the kernel keeps, as exit() does
