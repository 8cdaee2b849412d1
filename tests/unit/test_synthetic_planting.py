"""Planted corruption in the synthetic pool: off by default (the plain pool keeps its bytes),
deterministic, and its ground truth (`planted.json`) names exactly what was planted."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kiln.contracts import make_uid
from kiln.data_curation.config import PlantConfig, SyntheticPoolConfig
from kiln.data_curation.synthetic import (
    COLORS,
    PLANTED_NAME,
    SHAPES,
    config_hash,
    generate_pool,
    read_planted,
)

PLAIN = SyntheticPoolConfig(num_samples=300, num_eval=20, image_size=16, rows_per_file=120, seed=5)
#: The plain pool's bytes and the default config's hash must not move with planting, or
#: every quickstart rerun regenerates. Made by the generator before planting existed
#: (commit 371f4d5), except the eval shard's tar headers: since kiln.storage's one tar
#: writer makes them, they carry the GNU magic ("ustar  ") instead of POSIX's ("ustar\0""00"),
#: the members' bytes unchanged.
PLAIN_TREE_SHA256 = "465576ae1c17377b7c439de9b875110b512ff43def31067b870e39f549411cd5"
DEFAULT_CONFIG_HASH = "133ea3eca5661d7ce9e5180ed4389d908cece2ffa392131bd9888e1b4d3d7eb8"

PLANTED = SyntheticPoolConfig(
    num_samples=400,
    num_eval=20,
    image_size=32,
    rows_per_file=150,
    seed=2,
    plant=PlantConfig(near_duplicates=0.2, mismatched=0.15, seed=4),
)


def _tree_sha256(root: Path) -> str:
    h = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            h.update(path[len(str(root)) :].encode())
            h.update(Path(path).read_bytes())
    return h.hexdigest()


def _named(caption: str) -> set[str]:
    """Colours and shapes a caption names (not the background's "blue sky")."""
    text = caption.lower().replace("blue sky", "sky")
    words = set(text.replace(",", " ").replace("!", " ").replace(":", " ").split())
    return {w for w in (*COLORS, *SHAPES) if {w, f"{w}s", f"{w}es"} & words}


def _rows(root: Path, info: dict) -> list[dict]:
    return pq.read_table([str(root / f) for f in info["files"]]).to_pylist()


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("planted")
    info = generate_pool(PLANTED, str(out))
    return out, info, read_planted(str(out))


@pytest.fixture(scope="module")
def plain_twin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The same pool without planting."""
    out = tmp_path_factory.mktemp("twin")
    return out, generate_pool(PLANTED.model_copy(update={"plant": None}), str(out))


def test_default_pool_is_byte_identical_to_before_planting(tmp_path: Path) -> None:
    generate_pool(PLAIN, str(tmp_path))
    assert _tree_sha256(tmp_path) == PLAIN_TREE_SHA256
    assert not (tmp_path / PLANTED_NAME).exists()
    assert "plant" not in SyntheticPoolConfig().model_dump(mode="json")
    assert config_hash(SyntheticPoolConfig()) == DEFAULT_CONFIG_HASH


def test_planting_is_deterministic(planted: tuple[Path, dict, dict], tmp_path: Path) -> None:
    out, info, _ = planted
    again = generate_pool(PLANTED, str(tmp_path))
    assert again == info
    assert _tree_sha256(tmp_path) == _tree_sha256(out)
    other_seed = PLANTED.model_copy(
        update={"plant": PlantConfig(near_duplicates=0.2, mismatched=0.15, seed=5)}
    )
    generate_pool(other_seed, str(tmp_path / "other"))
    assert read_planted(str(tmp_path / "other")) != read_planted(str(out))


def test_counts_and_uids(planted: tuple[Path, dict, dict]) -> None:
    out, info, truth = planted
    copies = sum(len(g) - 1 for g in truth["near_duplicates"])
    assert copies == round(400 * 0.2) == info["counts"]["planted_near_duplicates"]
    assert len(truth["mismatched"]) == round(400 * 0.15) == info["counts"]["planted_mismatched"]
    assert info["num_rows"] == info["counts"]["rows"] == len(_rows(out, info))
    uids = {make_uid(r["url"], r["text"]) for r in _rows(out, info)}
    named = {u for g in truth["near_duplicates"] for u in g} | set(truth["mismatched"])
    assert named <= uids  # every uid of the ground truth is a row of the pool
    in_groups = [u for g in truth["near_duplicates"] for u in g]
    assert len(in_groups) == len(set(in_groups))
    assert not set(in_groups) & set(truth["mismatched"])


def test_mismatched_rows_are_exactly_the_recaptioned_ones(
    planted: tuple[Path, dict, dict], plain_twin: tuple[Path, dict]
) -> None:
    out, info, truth = planted
    twin = {r["url"]: r for r in _rows(*plain_twin)}
    changed = set()
    for row in _rows(out, info):
        before = twin.get(row["url"])
        if before is None:
            assert "planted-" in row["url"]  # a near-duplicate copy, added
            continue
        assert row["image"] == before["image"]  # planting changes no existing image
        if row["text"] != before["text"]:
            changed.add(make_uid(row["url"], row["text"]))
            shown, said = _named(before["text"]), _named(row["text"])
            assert shown and said and not shown & said, (before["text"], row["text"])
    assert changed == set(truth["mismatched"])


def test_near_duplicates_are_slightly_changed_copies(planted: tuple[Path, dict, dict]) -> None:
    out, info, truth = planted
    rows = {make_uid(r["url"], r["text"]): r for r in _rows(out, info)}

    def pixels(uid: str) -> np.ndarray:
        with Image.open(io.BytesIO(rows[uid]["image"])) as im:
            return np.asarray(im.convert("RGB"), np.float32)

    copy_diffs, other_diffs = [], []
    groups = truth["near_duplicates"]
    for i, (source, *copies) in enumerate(groups):
        for c in copies:
            assert rows[c]["image"] != rows[source]["image"]  # re-encoded, changed
            assert rows[c]["image"][:3] == b"\xff\xd8\xff"  # JPEG
            copy_diffs.append(np.abs(pixels(c) - pixels(source)).mean())
        other = groups[(i + 1) % len(groups)][0]
        other_diffs.append(np.abs(pixels(other) - pixels(source)).mean())
    assert np.median(copy_diffs) < 0.4 * np.median(other_diffs)
    texts = [rows[c]["text"] == rows[g[0]]["text"] for g in groups for c in g[1:]]
    assert 0 < sum(texts) < len(texts)  # some keep the caption, some get a paraphrase


def test_eval_set_does_not_change_with_planting(
    planted: tuple[Path, dict, dict], plain_twin: tuple[Path, dict]
) -> None:
    out, info, _ = planted
    twin_out, twin_info = plain_twin
    for shard in info["eval"]["shards"]:
        assert (out / shard).read_bytes() == (twin_out / shard).read_bytes()
    assert twin_info["eval"]["shards"] == info["eval"]["shards"]


def test_read_planted_of_a_plain_pool_says_how_to_plant(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="plant"):
        read_planted(str(tmp_path))


def test_plant_config_bounds() -> None:
    with pytest.raises(ValueError, match="mismatched"):
        PlantConfig(mismatched=0.95)
    with pytest.raises(ValueError, match="near_duplicates"):
        PlantConfig(near_duplicates=-0.1)
