"""What `kiln submit` decides before it talks to a cluster: the address, and the recipe the
job will run (validated, paths absolute, joining the cluster it runs on)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kiln.platform.jobs import JobError, prepare_recipe, resolve_address

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart"


@pytest.fixture(autouse=True)
def _no_address_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_address_flag_then_kiln_address_then_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(JobError, match="no cluster address: pass --address http://HEAD:8265"):
        resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://ray-head:8265")
    assert resolve_address(None) == "http://ray-head:8265"
    monkeypatch.setenv("KILN_ADDRESS", "kiln-head:8265/")
    assert resolve_address(None) == "http://kiln-head:8265"  # http:// added, slash dropped
    assert resolve_address("https://other:443") == "https://other:443"


@pytest.mark.parametrize("bad", ["ray://head:10001", "auto", "ftp://head:8265"])
def test_non_dashboard_addresses_are_named(bad: str) -> None:
    with pytest.raises(JobError, match="dashboard"):
        resolve_address(bad)


def test_prepared_recipes_join_the_cluster_with_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    train = prepare_recipe(QUICKSTART / "train.yaml", ["run_dir=runs/mine"])
    assert train.run_dir == os.path.join(tmp_path, "runs/mine")
    # the recipe's own relative paths resolve against its folder, --set ones against the cwd
    assert train.data.dataset == os.path.normpath(
        QUICKSTART / "../../runs/quickstart/curate/dataset"
    )
    assert train.ray.address == "auto"  # Ray Train on the cluster the job runs on
    local = prepare_recipe(QUICKSTART / "train.yaml", ["resources.launcher=local"])
    assert local.ray.address is None  # ranks as processes of the job: no Ray needed
    curate = prepare_recipe(QUICKSTART / "curate.yaml")
    assert curate.ray.address == "auto"
    pool = prepare_recipe(QUICKSTART / "curate.yaml", ["execution.executor=local"])
    assert pool.ray.address is None  # recipes reject a local executor with an address
    assert prepare_recipe(QUICKSTART / "eval.yaml").ray.address is None


def test_torchrun_and_bad_fields_fail_before_submitting() -> None:
    with pytest.raises(JobError, match="launcher=torchrun needs torchrun or srun"):
        prepare_recipe(QUICKSTART / "train.yaml", ["resources.launcher=torchrun"])
    with pytest.raises(ValueError, match=r"unknown field 'optim\.lrr'"):
        prepare_recipe(QUICKSTART / "train.yaml", ["optim.lrr=0.1"])
