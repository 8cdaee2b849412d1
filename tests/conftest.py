"""Shared fixtures: the real data folder, a one-rank process group, and the environment
every test process needs."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_SCHEMAS = REPO.parent / "shared" / "schemas"

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


@pytest.fixture(scope="session")
def shared_schemas() -> Path:
    """`../shared/schemas` beside the repo: third-party schemas kiln's files are checked
    against (KubeRay's CRDs; read-only)."""
    if not SHARED_SCHEMAS.is_dir():
        pytest.skip(
            f"schema folder {SHARED_SCHEMAS} is missing: these tests need the shared checkout "
            "beside the repo (../shared/schemas, e.g. kuberay/ray.io_rayjobs.yaml)"
        )
    return SHARED_SCHEMAS


@pytest.fixture
def single_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A one-rank gloo world in this process (what the launchers set up per rank)."""
    from kiln.training.launch import free_port

    port = free_port()
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    yield
    if dist.is_initialized():
        ds_comm = sys.modules.get("deepspeed.comm.comm")  # where its `cdb` global lives
        if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
            ds_comm.destroy_process_group()  # also drops DeepSpeed's cached groups
        else:
            dist.destroy_process_group()
