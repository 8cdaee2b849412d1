"""Shared fixtures: the real data folder, a one-rank process group, and the environment
every test process needs; the lanes `make test` runs the integration tests in."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from kiln.storage import atomic_write

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_SCHEMAS = REPO.parent / "shared" / "schemas"

# DeepSpeed picks its accelerator at import; kiln trains on CPU unless a GPU is present.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


# Built once per test session and used by tests in several files (tests/integration/
# conftest.py): a Ray, a two-node cluster, a reference run to compare with.
SHARED_SESSION_FIXTURES = ("ray_session", "two_node_cluster", "short_reference_run")
# Where the workers of a `make test` integration run leave each test file's lane group for
# the scheduler (the controller, which collects nothing itself, reads it once they have).
_LANES_FILE_ENV = "KILN_TEST_LANES_FILE"


def lane_groups(files_fixtures: dict[str, set[str]]) -> dict[str, str]:
    """Each test file's lane group: the files that share a session fixture, transitively, form
    one group (its instance is then built once, in one lane); any other file is its own
    group (its module fixtures and its tests' order stay together). Named after the group's
    first file."""
    order = {f: i for i, f in enumerate(files_fixtures)}
    group = {f: f for f in files_fixtures}
    owner: dict[str, str] = {}

    def root(f: str) -> str:
        while group[f] != f:
            f = group[f]
        return f

    for f, used in files_fixtures.items():
        for name in sorted(used & set(SHARED_SESSION_FIXTURES)):
            if name not in owner:
                owner[name] = f
                continue
            a, b = sorted((root(f), root(owner[name])), key=order.__getitem__)
            group[b] = a  # the earlier file names the merged group
    return {f: root(f) for f in files_fixtures}


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("dist", "no") == "loadfile" and not hasattr(config, "workerinput"):
        fd, path = tempfile.mkstemp(prefix="kiln-test-lanes-", suffix=".json")
        os.close(fd)
        os.environ[_LANES_FILE_ENV] = path  # the workers, started after this, inherit it
        config.add_cleanup(lambda: Path(path).unlink(missing_ok=True))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Orders the largest lane group first (the chain of session-fixture users: the other
    lane then runs beside it rather than after it) and, in a worker of `make test`'s
    integration run, writes each file's group where the scheduler reads it."""
    files: dict[str, set[str]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], set()).update(
            getattr(item, "fixturenames", ())
        )
    groups = lane_groups(files)
    size: dict[str, int] = {}
    for item in items:
        g = groups[item.nodeid.split("::")[0]]
        size[g] = size.get(g, 0) + 1
    shared = {g for f, g in groups.items() if files[f] & set(SHARED_SESSION_FIXTURES)}
    first = max(shared, key=lambda g: size[g], default=None)
    items.sort(key=lambda item: groups[item.nodeid.split("::")[0]] != first)  # stable
    if path := os.environ.get(_LANES_FILE_ENV):
        atomic_write(path, json.dumps(groups, sort_keys=True).encode())


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's loadfile
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make test` runs the integration and end-to-end tests in two lanes (`-n 2 --dist
    loadfile`): one test at a time keeps 1.4 of the 2 cores busy on average (process starts
    are single-threaded). A lane takes a whole file, as loadfile does, and the files that
    share a session fixture as one unit (`lane_groups`), so a Ray or a cluster is never
    built twice. Other `-n` runs keep xdist's schedulers."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedFixtureLanes(LoadFileScheduling):
        groups: dict[str, str] | None = None

        def schedule(self) -> None:  # called once every worker has collected
            if self.groups is None:
                text = Path(os.environ[_LANES_FILE_ENV]).read_text()
                self.groups = json.loads(text) if text else {}
            super().schedule()

        def _split_scope(self, nodeid: str) -> str:
            file: str = super()._split_scope(nodeid)
            return (self.groups or {}).get(file, file)

    return SharedFixtureLanes(config, log)


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
        from tests.helpers_training import destroy_groups

        destroy_groups()
