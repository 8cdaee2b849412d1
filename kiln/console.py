"""kiln's own terminal lines, kept apart from what the libraries under it print.

A kiln process prints its own `[kiln] ...` lines (and its tables); Ray, DeepSpeed, torch
and gloo print many more, from Python (`print`, `logging`) and from C++ (straight to file
descriptors 1 and 2). `kiln.platform.logs` sends the libraries' output to the run dir's
`logs/` folder; this module is the part every layer shares (training and curation
included), so it imports nothing of kiln:

- `verbose()`: whether the user asked for the libraries' output too (`kiln -v`, exported
  as ``KILN_VERBOSE=1`` so ranks and workers started by this process know);
- `kiln_stream()` / `say()`: where kiln's lines go, the terminal even while this process's
  library output is redirected to a file;
- `library_output_to(path)`: redirect this process's stdout and stderr (file descriptors
  and `sys.stdout` / `sys.stderr`) to a log file for a block, keeping `kiln_stream()` on
  the terminal (a torchrun rank, whose output torchrun would print for every rank).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

__all__ = [
    "ANSI_ESCAPE",
    "KILN_PREFIX",
    "VERBOSE_ENV",
    "kiln_stream",
    "library_output_to",
    "say",
    "strip_ansi",
    "verbose",
]

VERBOSE_ENV = "KILN_VERBOSE"
KILN_PREFIX = "[kiln] "
#: colour and cursor codes (Ray colours its worker prefixes, tqdm moves the cursor)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

_terminal: TextIO | None = None  # set while library output is redirected


def verbose() -> bool:
    """True when library output should reach the terminal too (`kiln -v`)."""
    return os.environ.get(VERBOSE_ENV, "") == "1"


def strip_ansi(text: str) -> str:
    """`text` without terminal escape codes (for files and pipes)."""
    return ANSI_ESCAPE.sub("", text)


def kiln_stream() -> TextIO:
    """The stream for kiln's own lines: the terminal kept aside by `library_output_to`, or
    `sys.stdout` (which, in a Ray worker or a local rank, its launcher collects)."""
    return _terminal if _terminal is not None else sys.stdout


def say(message: str, *, stream: TextIO | None = None) -> None:
    """Print one `[kiln] message` line on `stream` (default `kiln_stream()`), flushed (a
    progress note must show before the wait it announces). Commands whose stdout is for
    scripts (`kiln submit` prints the job id) pass `sys.stderr`."""
    out = stream if stream is not None else kiln_stream()
    out.write(f"{KILN_PREFIX}{message}\n")
    out.flush()


@contextlib.contextmanager
def library_output_to(path: str | Path) -> Iterator[Path | None]:
    """Append everything this process prints (Python and C++, stdout and stderr) to `path`
    for the block, while `kiln_stream()` keeps writing to the terminal. Yields the path;
    with `verbose()` it redirects nothing and yields None."""
    global _terminal
    if verbose() or _terminal is not None:
        yield None
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    old_streams = sys.stdout, sys.stderr
    terminal = io.TextIOWrapper(
        io.FileIO(os.dup(saved[1]), "w"), line_buffering=True, errors="replace"
    )
    log_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        sys.stdout = io.TextIOWrapper(io.FileIO(os.dup(1), "w"), line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(os.dup(2), "w"), line_buffering=True)
        _terminal = terminal
        yield target
    finally:
        _terminal = None
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
                stream.close()
        sys.stdout, sys.stderr = old_streams
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(log_fd)
        terminal.close()
