"""WebDataset shard writer: byte reproducibility, tar headers, manifest, interop, bad rows."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import webdataset as wds
from PIL import Image

from kiln.contracts import DatasetManifest, canonical_json, json_sha256, read_manifest
from kiln.data_curation.shard import write_shards


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _table(n: int = 7, *, images: bool = True) -> pa.Table:
    uids = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(n)]
    uids.sort()
    return pa.table(
        {
            "uid": uids,
            "text": [f"caption {i} é" if i != 2 else None for i in range(n)],
            "url": [f"http://x/{i}.jpg" for i in range(n)],
            "image": pa.array(
                [_jpeg((i * 30 % 256, 0, 0)) if images else None for i in range(n)], pa.binary()
            ),
            "width": pa.array([20] * n, pa.int32()),
            "height": pa.array([12] * n, pa.int32()),
            "source": ["pool.parquet"] * n,
            "entry_ids": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int32())),
            "keep_prob": [0.5 if i != 3 else float("nan") for i in range(n)],
        }
    )


def _write(out: Path, table: pa.Table, per_shard: int = 3, **kw: Any) -> DatasetManifest:
    return write_shards(
        [table.slice(0, 4), table.slice(4)],  # batch boundaries differ from shard boundaries
        str(out),
        per_shard,
        name=kw.get("name", "tiny"),
        recipe=kw.get("recipe", {"balance": {"t": 5}, "name": "tiny"}),
        inputs=["pool.parquet"],
        stats={"samples_in": 10},
    )


def test_rerun_is_byte_identical(tmp_path: Path) -> None:
    table = _table()
    a = _write(tmp_path / "a", table)
    b = _write(tmp_path / "b", table)
    again = _write(tmp_path / "a", table)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert a == again
    for shard in a.shards:
        assert (tmp_path / "a" / shard.path).read_bytes() == (
            tmp_path / "b" / shard.path
        ).read_bytes()
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (
        tmp_path / "b" / "manifest.json"
    ).read_bytes()


def test_manifest_describes_the_files(tmp_path: Path) -> None:
    recipe = {"name": "tiny", "balance": {"t": 5}}
    manifest = _write(tmp_path, _table(), recipe=recipe)
    assert [s.path for s in manifest.shards] == [
        "shards/000000.tar",
        "shards/000001.tar",
        "shards/000002.tar",
    ]
    assert [s.num_samples for s in manifest.shards] == [3, 3, 1]
    assert manifest.num_samples == 7
    for shard in manifest.shards:
        data = (tmp_path / shard.path).read_bytes()
        assert shard.bytes == len(data)
        assert shard.sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.recipe == recipe
    assert manifest.recipe_hash == hashlib.sha256(canonical_json(recipe).encode()).hexdigest()
    assert manifest.recipe_hash == json_sha256({"balance": {"t": 5}, "name": "tiny"})
    assert manifest.inputs == ["pool.parquet"]
    assert manifest.stats == {"samples_in": 10}
    assert read_manifest(str(tmp_path)) == manifest
    assert not list(tmp_path.rglob("*.tmp"))


def test_tar_headers_are_deterministic_and_members_ordered(tmp_path: Path) -> None:
    table = _table(3)
    manifest = _write(tmp_path, table, per_shard=10)
    with tarfile.open(tmp_path / manifest.shards[0].path) as tar:
        members = tar.getmembers()
    uids = table.column("uid").to_pylist()
    assert [m.name for m in members] == [
        f"{u}.{ext}" for u in uids for ext in ("jpg", "txt", "json")
    ]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
        assert m.isfile()


def test_sample_json_and_text(tmp_path: Path) -> None:
    table = _table(5)
    manifest = _write(tmp_path, table, per_shard=10)
    with tarfile.open(tmp_path / manifest.shards[0].path) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    uids = table.column("uid").to_pylist()
    doc = json.loads(files[f"{uids[3]}.json"])
    assert list(doc) == sorted(doc)
    assert doc["uid"] == uids[3]
    assert doc["entry_ids"] == [3, 4]
    assert doc["keep_prob"] is None  # NaN is not JSON
    assert (doc["width"], doc["height"], doc["url"], doc["source"]) == (
        20,
        12,
        "http://x/3.jpg",
        "pool.parquet",
    )
    assert "image" not in doc and "text" not in doc
    assert files[f"{uids[0]}.txt"].decode() == "caption 0 é"
    assert files[f"{uids[2]}.txt"] == b""  # null caption
    assert files[f"{uids[1]}.jpg"] == table.column("image")[1].as_py()


def test_readable_by_webdataset_and_tar(tmp_path: Path) -> None:
    table = _table()
    manifest = _write(tmp_path, table)
    urls = [str(tmp_path / s.path) for s in manifest.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == table.column("uid").to_pylist()
    first = samples[0]
    assert Image.open(io.BytesIO(first["jpg"])).size == (20, 12)
    assert json.loads(first["json"])["uid"] == first["__key__"]
    assert first["txt"].decode() == "caption 0 é"
    listing = subprocess.run(
        ["tar", "-tf", urls[0]], check=True, capture_output=True, text=True
    ).stdout.split()
    assert len(listing) == 9
    assert listing[0].endswith(".jpg")


def test_caption_only_rows_have_no_jpg(tmp_path: Path) -> None:
    manifest = _write(tmp_path, _table(4, images=False), per_shard=10)
    with tarfile.open(tmp_path / manifest.shards[0].path) as tar:
        names = tar.getnames()
    assert len(names) == 8
    assert not [n for n in names if n.endswith(".jpg")]


def test_stale_shards_of_a_bigger_run_are_removed(tmp_path: Path) -> None:
    _write(tmp_path, _table(7), per_shard=2)
    assert len(list((tmp_path / "shards").iterdir())) == 4
    manifest = _write(tmp_path, _table(7), per_shard=10)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["000000.tar"]
    assert manifest.num_samples == 7


def test_empty_input_writes_an_empty_manifest(tmp_path: Path) -> None:
    manifest = write_shards([], str(tmp_path), 5, name="none", recipe={}, inputs=[], stats={})
    assert manifest.num_samples == 0 and manifest.shards == []
    assert read_manifest(str(tmp_path)).num_samples == 0


@pytest.mark.parametrize(
    ("uids", "message"),
    [
        (["b", "a"], "comes after 'b'"),
        (["a", "a"], "appears twice"),
        (["a.b"], "contains '.'"),
        ([""], "non-empty string"),
    ],
)
def test_bad_uids_are_errors(tmp_path: Path, uids: list[str], message: str) -> None:
    table = pa.table({"uid": uids, "text": ["t"] * len(uids)})
    with pytest.raises(ValueError, match=message):
        write_shards([table], str(tmp_path), 10, name="x", recipe={}, inputs=[], stats={})
    assert not (tmp_path / "manifest.json").exists()


def test_samples_per_shard_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="samples_per_shard=0"):
        write_shards([_table(1)], str(tmp_path), 0, name="x", recipe={}, inputs=[], stats={})


def test_tar_member_is_what_tarfile_writes() -> None:
    """kiln's fast member encoder gives the bytes of `tarfile` for the same fixed fields."""
    import io
    import tarfile

    from kiln.storage import tar_end, tar_member

    members = [
        ("0123abcd.jpg", b"\xff\xd8" * 700),
        ("0123abcd.txt", "ü caption".encode()),
        ("x.json", b""),
    ]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    body = b"".join(tar_member(n, d) for n, d in members)
    assert body + tar_end(len(body)) == out.getvalue()
    with pytest.raises(ValueError, match="over 100 bytes"):
        tar_member("x" * 101, b"")


def _mixed_table(seed: int, n: int = 60) -> pa.Table:
    """Rows with and without images (null, empty), null / non-ASCII / long captions, lists,
    NaN, uids of several lengths; two chunks."""
    import random

    r = random.Random(seed)
    uids = sorted({f"{r.getrandbits(160):040x}"[: r.choice([8, 32, 40])] for _ in range(n)})
    rows = [
        {
            "uid": u,
            "text": r.choice([None, "", "héllo wörld ✓", "a" * r.randint(0, 700)]),
            "image": r.choice([None, b"", r.randbytes(r.randint(1, 1500))]),
            "url": f"http://x/{u}",
            "entry_ids": [r.randint(0, 9) for _ in range(r.randint(0, 3))],
            "keep_prob": r.choice([0.5, float("nan"), None]),
            "_image_file": "internal",
        }
        for u in uids
    ]
    table = pa.Table.from_pylist(rows)
    return pa.concat_tables([table.slice(0, n // 3), table.slice(n // 3)])


@pytest.mark.parametrize("seed", range(6))
def test_encode_samples_writes_the_bytes_of_the_per_row_encoder(seed: int) -> None:
    """The block encoder (numpy headers, image bytes as views) gives exactly the bytes of
    `sample_records`, the per-row reference, for all rows and for a subset by index."""
    import numpy as np

    from kiln.data_curation.shard import encode_samples, sample_records

    table = _mixed_table(seed)
    buffers, last = encode_samples(table)
    assert b"".join(bytes(b) for b in buffers) == b"".join(r for _, r in sample_records(table))
    assert last == table.column("uid")[-1].as_py()
    rows = np.sort(np.random.default_rng(seed).permutation(table.num_rows)[:25])
    subset = b"".join(r for _, r in sample_records(table.take(pa.array(rows))))
    assert b"".join(bytes(b) for b in encode_samples(table, rows)[0]) == subset


@pytest.mark.parametrize(
    ("uids", "message"),
    [
        (["a", None], "non-empty string"),
        (["a", "b/c"], "contains '.', '/'"),
        (["a", "x" * 97], "over 100 bytes"),
    ],
)
def test_encode_samples_refuses_bad_uids(uids: list[str | None], message: str) -> None:
    from kiln.data_curation.shard import encode_samples

    with pytest.raises(ValueError, match=message):
        encode_samples(pa.table({"uid": pa.array(uids, pa.string()), "text": ["t"] * len(uids)}))


def test_encode_samples_checks_order_against_the_previous_block() -> None:
    from kiln.data_curation.shard import encode_samples

    table = pa.table({"uid": ["m", "n"], "text": ["a", "b"]})
    with pytest.raises(ValueError, match="comes after 'z'"):
        encode_samples(table, previous="z")
