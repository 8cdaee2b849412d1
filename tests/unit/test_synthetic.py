"""The procedural demo pool: determinism, idempotence, long tail, planted noise, eval set."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kiln.contracts import read_manifest, sha256_hex
from kiln.data_curation.config import ImageConfig, SyntheticPoolConfig, TextConfig
from kiln.data_curation.matching import EntryMatcher, load_entries
from kiln.data_curation.stages import count_reasons
from kiln.data_curation.stages.image import apply_image_checks
from kiln.data_curation.stages.metaclip_balance import dense_counts, sparse_counts
from kiln.data_curation.stages.metaclip_match import match_table
from kiln.data_curation.stages.text import apply_text_filters
from kiln.data_curation.synthetic import (
    COLORS,
    NEVER_OCCURRING_ENTRIES,
    SHAPES,
    concept_names,
    generate_pool,
)

CFG = SyntheticPoolConfig(num_samples=1200, num_eval=60, image_size=32, rows_per_file=500, seed=3)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pool")
    return out, generate_pool(CFG, str(out))


@pytest.fixture(scope="module")
def table(pool: tuple[Path, dict]) -> pa.Table:
    out, info = pool
    table = pq.read_table([str(out / f) for f in info["files"]])
    uids = [f"{i:032x}" for i in range(table.num_rows)]
    return table.append_column("uid", pa.array(uids))


def _files(root: str) -> dict[str, bytes]:
    fs, path = fsspec.core.url_to_fs(root)
    result = {}
    for name in fs.find(path):
        result[name[len(path.rstrip("/")) + 1 :]] = fs.cat_file(name)
    return result


def test_layout_and_schema(pool: tuple[Path, dict]) -> None:
    out, info = pool
    assert info["files"] == ["pool-00000.parquet", "pool-00001.parquet", "pool-00002.parquet"]
    assert [pq.read_metadata(out / f).num_rows for f in info["files"]] == [500, 500, 200]
    schema = pq.read_schema(out / info["files"][0])
    assert schema.names == ["url", "text", "image"]
    assert schema.field("image").type == pa.binary()
    assert info["num_rows"] == CFG.num_samples
    assert (out / "_SUCCESS").is_file() and (out / "metadata.txt").is_file()


def test_generation_is_byte_deterministic_across_filesystems(pool: tuple[Path, dict]) -> None:
    out, info = pool
    again = generate_pool(CFG, "memory://kiln-synthetic-test/pool")
    assert again == info
    assert _files("memory://kiln-synthetic-test/pool") == _files(str(out))
    fsspec.filesystem("memory").rm("/kiln-synthetic-test", recursive=True)


def test_rerun_is_a_no_op_and_a_new_config_regenerates(tmp_path: Path) -> None:
    cfg = SyntheticPoolConfig(num_samples=40, num_eval=4, image_size=16, rows_per_file=15)
    info = generate_pool(cfg, str(tmp_path))
    marker_mtime = (tmp_path / "_SUCCESS").stat().st_mtime_ns
    first_file = tmp_path / "pool-00000.parquet"
    first_file.write_bytes(b"tampered")  # a no-op rerun must not rewrite anything
    assert generate_pool(cfg, str(tmp_path)) == info
    assert first_file.read_bytes() == b"tampered"
    assert (tmp_path / "_SUCCESS").stat().st_mtime_ns == marker_mtime
    changed = generate_pool(cfg.model_copy(update={"rows_per_file": 40}), str(tmp_path))
    assert changed["cfg_hash"] != info["cfg_hash"]
    assert sorted(p.name for p in tmp_path.glob("pool-*.parquet")) == ["pool-00000.parquet"]
    assert pq.read_table(first_file).num_rows == 40


def test_long_tailed_concepts(pool: tuple[Path, dict], table: pa.Table) -> None:
    _, info = pool
    counts = info["concept_counts"]
    assert set(counts) == set(concept_names()) and len(counts) == len(COLORS) * len(SHAPES)
    assert min(counts.values()) >= 1
    assert max(counts.values()) >= 100 * min(counts.values())
    # the captions carry the tail too: "colour shape" metadata entries are long-tailed
    out, _ = pool
    entries = load_entries(str(out / "metadata.txt"))
    matched = match_table(table, EntryMatcher(entries))
    entry_counts = dense_counts(sparse_counts(matched), len(entries))
    pairs = [entry_counts[entries.index(c)] for c in concept_names()]
    positive = [c for c in pairs if c > 0]
    assert max(positive) >= 100 * min(positive)
    for entry in NEVER_OCCURRING_ENTRIES:
        assert entry_counts[entries.index(entry)] == 0


def test_planted_junk_duplicates_and_bad_images(pool: tuple[Path, dict], table: pa.Table) -> None:
    _, info = pool
    planted = info["counts"]
    assert planted["junk_text"] > 0 and planted["bad_images"] > 0
    assert planted["exact_duplicates"] > 0 and planted["near_duplicates"] > 0
    # every junk alt-text, and nothing else, is caught by the text stage
    texts = apply_text_filters(table, TextConfig())
    reasons = count_reasons(texts)
    assert reasons.get("empty_text", 0) + reasons.get("junk_text", 0) == planted["junk_text"]
    assert set(reasons) <= {"empty_text", "junk_text"}
    # every planted bad image, and nothing else, is caught by the image stage
    images = apply_image_checks(table, ImageConfig(min_size=16))
    assert count_reasons(images) == {"bad_image": planted["bad_images"]}
    # exact duplicates: identical (url, text, image)
    rows = table.select(["url", "text", "image"]).to_pylist()
    keys = [(r["url"], r["text"], r["image"]) for r in rows]
    assert len(keys) - len(set(keys)) == planted["exact_duplicates"]
    # near duplicates: same pixels under another url, some with other encoded bytes
    by_hash: dict[str, set[str]] = {}
    by_hash_bytes: dict[str, set[bytes]] = {}
    hashes = images.column("image_sha256").to_pylist()
    for r, digest in zip(rows, hashes, strict=True):
        if digest is not None:
            by_hash.setdefault(digest, set()).add(r["url"])
            by_hash_bytes.setdefault(digest, set()).add(r["image"])
    assert sum(len(u) - 1 for u in by_hash.values()) == planted["near_duplicates"]
    assert any(len(b) > 1 for b in by_hash_bytes.values())
    assert all(u.startswith("https://pool.example/img/") for u in table.column("url").to_pylist())


def _near(image: Image.Image, rgb: tuple[int, int, int], radius: float = 60.0) -> float:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3)
    return float((np.linalg.norm(pixels - np.array(rgb), axis=1) < radius).mean())


def test_eval_set(pool: tuple[Path, dict], table: pa.Table) -> None:
    out, _ = pool
    eval_dir = out / "eval"
    manifest = read_manifest(str(eval_dir))
    assert manifest.name == "synthetic-eval" and manifest.num_samples == CFG.num_eval
    zero_shot = json.loads((eval_dir / "zero_shot.json").read_text())
    tasks = {t["name"]: t for t in zero_shot["tasks"]}
    assert tasks["color"]["classnames"] == list(COLORS)
    assert tasks["shape"]["classnames"] == list(SHAPES)
    assert all("{}" in t for task in tasks.values() for t in task["templates"])

    pool_hashes = set(
        apply_image_checks(table, ImageConfig(min_size=1)).column("image_sha256").to_pylist()
    )
    seen_colors, seen_shapes = set(), set()
    for shard in manifest.shards:
        data = (eval_dir / shard.path).read_bytes()
        assert len(data) == shard.bytes and sha256_hex(data) == shard.sha256
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = tar.getmembers()
            files = {m.name: tar.extractfile(m).read() for m in members}  # type: ignore[union-attr]
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
        names = [m.name for m in members]
        uids = list(dict.fromkeys(n.split(".")[0] for n in names))
        assert names == [f"{u}.{ext}" for u in uids for ext in ("jpg", "json", "txt")]
        for uid in uids:
            meta = json.loads(files[f"{uid}.json"])
            assert meta["uid"] == uid
            color, shape = meta["labels"]["color"], meta["labels"]["shape"]
            seen_colors.add(color)
            seen_shapes.add(shape)
            caption = files[f"{uid}.txt"].decode().lower()
            assert color in caption and shape in caption
            image = Image.open(io.BytesIO(files[f"{uid}.jpg"]))
            assert image.format == "JPEG" and image.size == (CFG.image_size, CFG.image_size)
            assert _near(image, COLORS[color]) > 0.02, (uid, color)
            out_table = apply_image_checks(
                pa.table({"image": [files[f"{uid}.jpg"]]}), ImageConfig(min_size=1)
            )
            assert out_table.column("image_sha256")[0].as_py() not in pool_hashes
    assert len(seen_colors) >= 6 and len(seen_shapes) >= 5
