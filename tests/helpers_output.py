"""Telling kiln's terminal lines from what the libraries under it print."""

from __future__ import annotations

import re

__all__ = ["library_lines"]

#: what Ray, DeepSpeed and torch print (kiln's own lines never look like this): Ray's
#: `(name pid=N)` prefix, timestamped log records, tracebacks, colour codes
_LIBRARY_LINE = re.compile(
    r"pid=\d+\)|^\[?\d{4}-\d\d-\d\d[ T]\d\d:\d\d|\x1b\[|Traceback|^\s+File \"|DeepSpeed|"
    r"core_worker|^\s*\^+\s*$|\b(WARNING|INFO|DEBUG)\b"
)


def library_lines(output: str) -> list[str]:
    """The lines of `output` that Ray / DeepSpeed / torch printed, not kiln."""
    return [ln for ln in output.splitlines() if _LIBRARY_LINE.search(ln) and "[kiln]" not in ln]
