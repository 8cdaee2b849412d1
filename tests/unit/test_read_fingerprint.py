"""The read step's fingerprint covers what it reads: a rerun after an input changed -- even
with its size kept and its mtime set back, as `cp -p` / `rsync -t` do -- reads it again and
gives the fresh result; a rerun after nothing changed reuses every step."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from PIL import Image

from kiln.contracts import read_manifest
from kiln.data_curation import CurationResult, run_curation
from kiln.data_curation.config import CurationConfig, InputConfig
from kiln.data_curation.read_fingerprint import (
    SMALL_FILE_BYTES,
    input_identity,
    read_fingerprint,
    tree_identity,
)


def _jpeg(value: int) -> bytes:
    pixels = np.full((24, 24, 3), value, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """What `cp -p` or `rsync -t` of a same-size file leaves: new bytes, the old mtime."""
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


@pytest.fixture
def pool(tmp_path: Path) -> dict[str, Any]:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.jpg").write_bytes(_jpeg(40 * i))
    captions = tmp_path / "captions.csv"
    captions.write_text("image,text\n0.jpg,a red dog\n1.jpg,a tan cat\n2.jpg,a big owl\n")
    spec = {
        "input": {
            "format": "csv",
            "paths": [str(captions)],
            "url_column": None,
            "image_dir": str(images),
            "image_path_column": "image",
        },
        "stages": [{"stage": "text"}, {"stage": "image"}],
        "execution": {"executor": "local", "workers": 1},
    }
    return {"spec": spec, "captions": captions, "images": images, "run": tmp_path / "run"}


def _run(pool: dict[str, Any], *, fresh: bool = False) -> CurationResult:
    cfg = CurationConfig.model_validate(pool["spec"])
    return run_curation(cfg, str(pool["run"]), fresh=fresh)


def _captions(result: CurationResult) -> list[str]:
    manifest = read_manifest(result.dataset_dir)
    out = []
    for shard in manifest.shards:
        with tarfile.open(manifest.shard_url(result.dataset_dir, shard)) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".txt"):
                    f = tar.extractfile(m)
                    assert f is not None
                    out.append(f.read().decode())
    return sorted(out)


def _shas(result: CurationResult) -> list[str]:
    return [s.sha256 for s in read_manifest(result.dataset_dir).shards]


def test_unchanged_inputs_reuse_every_step(pool: dict[str, Any]) -> None:
    before = _shas(_run(pool))
    again = _run(pool)
    assert all(s.reused for s in again.steps.values())
    assert _shas(again) == before


def test_caption_edit_with_size_and_mtime_kept_is_read_again(pool: dict[str, Any]) -> None:
    first = _run(pool)
    assert _captions(first) == ["a big owl", "a red dog", "a tan cat"]
    text = pool["captions"].read_text().replace("a tan cat", "a tan elk")
    _rewrite_keeping_size_and_mtime(pool["captions"], text.encode())
    again = _run(pool)
    assert not again.steps["read"].reused
    assert _captions(again) == ["a big owl", "a red dog", "a tan elk"]


def test_image_replaced_with_size_and_mtime_kept_is_read_again(pool: dict[str, Any]) -> None:
    before = _shas(_run(pool))
    old = (pool["images"] / "1.jpg").read_bytes()
    new = _jpeg(200)
    new = new[: len(old)] if len(new) >= len(old) else new + b"\0" * (len(old) - len(new))
    _rewrite_keeping_size_and_mtime(pool["images"] / "1.jpg", new)
    again = _run(pool)
    assert not again.steps["read"].reused and not again.steps["image"].reused
    assert _shas(again) != before


def test_fresh_redoes_every_step(pool: dict[str, Any]) -> None:
    before = _shas(_run(pool))
    again = _run(pool, fresh=True)
    assert not any(s.reused for s in again.steps.values())
    assert again.steps["read"].tasks_reused == 0
    assert _shas(again) == before  # the same bytes, made again


def test_small_inputs_are_fingerprinted_by_content(tmp_path: Path) -> None:
    small = tmp_path / "small.csv"
    small.write_bytes(b"text\nhello\n")
    identity = input_identity(str(small))
    assert identity[0] == str(small) and identity[1] == 11
    assert identity[-1] == "sha256:" + hashlib.sha256(b"text\nhello\n").hexdigest()
    big = tmp_path / "big.csv"
    big.write_bytes(b"x" * (SMALL_FILE_BYTES + 1))
    assert not str(input_identity(str(big))[-1]).startswith("sha256:")


def test_image_dir_tree_identity_sees_every_change(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"aaaa")
    (root / "sub" / "b.jpg").write_bytes(b"bbbb")
    (root / "loop").symlink_to(root)  # a link back up the tree is walked once
    base = tree_identity(str(root))
    assert base["files"] == 2 and tree_identity(str(root)) == base
    _rewrite_keeping_size_and_mtime(root / "sub" / "b.jpg", b"BBBB")
    changed = tree_identity(str(root))
    assert changed["sha256"] != base["sha256"]
    (root / "c.jpg").write_bytes(b"c")
    assert tree_identity(str(root))["files"] == 3
    cfg = InputConfig(format="csv", paths=["x.csv"], image_dir=str(root), image_path_column="image")
    small = tmp_path / "x.csv"
    small.write_text("image,text\n")
    assert read_fingerprint(cfg, [str(small)])["image_dir"]["files"] == 3
    no_images = cfg.model_copy(update={"image_path_column": None})
    assert "image_dir" not in read_fingerprint(no_images, [str(small)])


def test_remote_tree_identity_uses_listing_versions() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/kiln-fp-test/imgs/a.jpg", b"aaaa")
    fs.pipe("/kiln-fp-test/imgs/b.jpg", b"bbbb")
    base = tree_identity("memory://kiln-fp-test/imgs")
    assert base["files"] == 2
    fs.pipe("/kiln-fp-test/imgs/b.jpg", b"bbbbb")  # memory fs: size and creation time
    assert tree_identity("memory://kiln-fp-test/imgs")["sha256"] != base["sha256"]
    fs.rm("/kiln-fp-test", recursive=True)


def test_kiln_curate_takes_fresh() -> None:
    from kiln.platform.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["curate", "r.yaml", "--fresh"]).fresh is True
    assert parser.parse_args(["curate", "r.yaml"]).fresh is False
