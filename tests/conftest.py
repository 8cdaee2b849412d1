"""Shared fixtures: the real data folder, and the environment every test process needs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# DeepSpeed picks its accelerator at import; kiln trains on CPU unless a GPU is present.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the repo: the real images, captions and shards (read-only)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"real data folder {SHARED_DATA} is missing: these tests need the shared data "
            "checkout beside the repo (../shared/data)"
        )
    return SHARED_DATA
