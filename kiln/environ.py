"""An environment variable set for a block: how kiln hands a setting to the processes a
block starts (ranks, Ray Train's controller), which read it from their environment."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["scoped_env"]


@contextlib.contextmanager
def scoped_env(name: str, value: str) -> Iterator[None]:
    """Environment variable `name` set to `value` for a block, then as it was."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
