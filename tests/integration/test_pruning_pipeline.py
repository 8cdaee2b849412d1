"""embed -> semdedup -> clip_score on the quickstart-sized procedural pool, through the real
runner: the Ray executor (embed's actor pool) and the local one give the same dataset, every
row is accounted for, and the uid index clip_score writes names exactly the kept samples."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kiln.contracts import read_manifest
from kiln.data_curation import run_curation
from kiln.data_curation.config import CurationConfig
from kiln.data_curation.stages.uid_index import read_uid_index, uid_pairs
from kiln.models.build import build_model
from kiln.models.config import ModelConfig
from kiln.training.evaluate import save_model_file
from tests.helpers_training import TINY_MODEL


def _dataset_uids(dataset_dir: str) -> list[str]:
    manifest = read_manifest(dataset_dir)
    uids = []
    for shard in manifest.shards:
        with tarfile.open(manifest.shard_url(dataset_dir, shard)) as tar:
            uids += [n.split(".", 1)[0] for n in tar.getnames() if n.endswith(".json")]
    return uids


def _cfg(tmp: Path, model: str, execution: dict[str, Any], out: str) -> CurationConfig:
    return CurationConfig.model_validate(
        {
            "input": {"format": "synthetic", "paths": [str(tmp / "pool")],
                      "synthetic": {"num_samples": 3000, "num_eval": 0, "image_size": 32}},
            "stages": [
                {"stage": "embed", "model": model, "batch_size": 128},
                {"stage": "semdedup", "num_clusters": 16, "eps": [0.01, 0.05, 0.2]},
                {"stage": "clip_score", "top_fraction": 0.8, "uids_out": out},
            ],
            "shard": {"samples_per_shard": 512},
            "execution": execution,
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A kiln checkpoint of the tiny CLIP (seeded weights): a real model file to embed with."""
    cfg = ModelConfig.model_validate(TINY_MODEL)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_model_file(str(path), build_model(cfg).eval(), cfg, step=1)


def test_embed_semdedup_clip_score_curate(
    ray_session: None, tiny_model: str, tmp_path: Path
) -> None:
    ray_out = str(tmp_path / "ray_kept.npy")
    first = run_curation(
        _cfg(tmp_path, tiny_model, {"executor": "ray", "key_buckets": 2}, ray_out),
        str(tmp_path / "run_ray"),
        name="prune",
    )
    assert first.samples_in == 3000
    assert first.samples_in == first.samples_out + sum(first.dropped_by_reason.values())
    dropped = first.dropped_by_reason
    assert dropped.get("semantic_duplicate", 0) >= 100  # the pool's planted exact copies
    assert dropped.get("bad_image", 0) > 0 and dropped.get("low_clip_score", 0) > 0
    semdedup = first.steps["semdedup"].extra
    kept = semdedup["kept_fraction_by_eps"]
    assert kept["0.01"] >= kept["0.05"] >= kept["0.2"]
    assert semdedup["clusters"] == 16
    assert first.steps["embed"].extra["model_sha256"]
    clip = first.steps["clip_score"].extra
    rows_in = first.steps["clip_score"].rows_in
    assert clip["kept"] == first.samples_out >= int(0.8 * rows_in)
    uids = _dataset_uids(first.dataset_dir)
    index = read_uid_index(ray_out)
    assert sorted(index.tolist()) == sorted(uid_pairs(uids).tolist())

    local_out = str(tmp_path / "local_kept.npy")
    second = run_curation(
        _cfg(tmp_path, tiny_model, {"executor": "local", "key_buckets": 5, "batch_size": 97,
                                    "rows_per_task": 700}, local_out),
        str(tmp_path / "run_local"),
        name="prune",
    )  # fmt: skip
    assert second.dropped_by_reason == first.dropped_by_reason
    assert _dataset_uids(second.dataset_dir) == uids
    np.testing.assert_array_equal(read_uid_index(local_out), index)
    a, b = read_manifest(first.dataset_dir), read_manifest(second.dataset_dir)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
