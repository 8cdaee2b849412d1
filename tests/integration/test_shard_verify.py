"""Training checks a curated dataset's shards against manifest.json before any rank starts:
a zeroed block in one shard is one clear error naming the shard, both hashes and the fix
(it used to fail at the first batch with a raw traceback, or silently train on garbage
pixels when the block fell inside a JPEG)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kiln.contracts import read_manifest
from kiln.platform.api import curate
from kiln.training import train
from kiln.training.config import TrainConfig
from kiln.training.shard_check import ShardChecksumError, verify_shards
from tests.helpers_datasets import curate_recipe
from tests.helpers_training import TINY_MODEL

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset written by `kiln curate` (the quickstart's plan on a small pool)."""
    root = tmp_path_factory.mktemp("curated")
    result = curate(curate_recipe(root))
    assert result.samples_out > 100 and len(read_manifest(result.dataset_dir).shards) > 2
    return Path(result.dataset_dir)


def _damaged_copy(curated: Path, tmp_path: Path) -> tuple[Path, str, str, str]:
    """A copy of the dataset with a 4 KiB block of its second shard zeroed, as a bad disk
    sector leaves it: (dataset, shard path, manifest's sha256, the damaged file's)."""
    copy = tmp_path / "dataset"
    shutil.copytree(curated, copy)
    shard = read_manifest(str(copy)).shards[1]
    path = copy / shard.path
    data = bytearray(path.read_bytes())
    mid = len(data) // 2 // 4096 * 4096
    data[mid : mid + 4096] = bytes(4096)
    path.write_bytes(bytes(data))
    actual = hashlib.sha256(data).hexdigest()
    assert actual != shard.sha256
    return copy, str(path), shard.sha256, actual


def _cfg(dataset: Path, **data: object) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {"dataset": str(dataset), "batch_size": 8, "num_workers": 0, **data},
            "model": TINY_MODEL,
            "max_steps": 2,
        }
    )


def test_intact_curated_dataset_verifies(curated: Path) -> None:
    took = verify_shards(str(curated), read_manifest(str(curated)))
    assert took >= 0


def test_zeroed_block_is_refused_before_any_rank_starts(curated: Path, tmp_path: Path) -> None:
    dataset, shard, expected, actual = _damaged_copy(curated, tmp_path)
    run = tmp_path / "run"
    with pytest.raises(ShardChecksumError) as err:
        train(_cfg(dataset), str(run), num_workers=2, launcher="local")
    message = str(err.value)
    assert shard in message and expected in message and actual in message
    assert "kiln curate" in message and "--fresh" in message
    assert not run.exists()  # refused in the launcher: no run dir, no rank, no log


def test_missing_shard_is_named(curated: Path, tmp_path: Path) -> None:
    copy = tmp_path / "dataset"
    shutil.copytree(curated, copy)
    shards = read_manifest(str(copy)).shards
    (copy / shards[-1].path).unlink()
    with pytest.raises(ShardChecksumError, match=re.escape(f"{shards[-1].path}' is missing")):
        verify_shards(str(copy), read_manifest(str(copy)))


def test_kiln_train_prints_one_clear_line(curated: Path, tmp_path: Path) -> None:
    dataset, shard, expected, actual = _damaged_copy(curated, tmp_path)
    recipe = tmp_path / "train.yaml"
    spec = {
        "kind": "train",
        "name": "damaged",
        "run_dir": str(tmp_path / "run"),
        "resources": {"workers": 1, "launcher": "local"},
        **_cfg(dataset).model_dump(mode="json", include={"data", "model", "max_steps"}),
    }
    recipe.write_text(yaml.safe_dump(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "kiln", "train", str(recipe)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert shard in errors[0] and expected in errors[0] and actual in errors[0]


def test_verify_shards_false_skips_the_check(curated: Path, tmp_path: Path) -> None:
    from kiln.training.preflight import preflight

    dataset, *_ = _damaged_copy(curated, tmp_path)
    preflight(_cfg(dataset, verify_shards=False), 1, tmp_path / "run", resume=False)
    with pytest.raises(ShardChecksumError):
        preflight(_cfg(dataset), 1, tmp_path / "run", resume=False)
