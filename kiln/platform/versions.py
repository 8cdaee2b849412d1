"""`kiln --version`: kiln's version and the versions of the libraries it runs on.

Read from the installed packages' metadata, so nothing heavy (torch, Ray) is imported.
"""

from __future__ import annotations

from importlib import metadata

import kiln

__all__ = ["version_text"]

#: Libraries whose versions decide how a run behaves, in the order printed.
_LIBRARIES = ("torch", "ray", "deepspeed", "pydantic", "pyarrow")


def version_text() -> str:
    """`kiln 0.1.0 (torch 2.13.0, ray 2.x, deepspeed 0.x, ...)`; a missing one says so."""
    parts = []
    for name in _LIBRARIES:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} not installed")
    return f"kiln {kiln.__version__} ({', '.join(parts)})"
