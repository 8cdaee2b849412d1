"""Readers on real pools: parquet (LAION alt-text), csv + image folder (Flickr8k), WebDataset
(a real img2dataset shard and webdataset's own odd test shards), jsonl, synthetic; paths."""

from __future__ import annotations

import json
import re
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.contracts import SAMPLE_SCHEMA, make_uid
from kiln.data_curation import read_pool
from kiln.data_curation.config import InputConfig, SyntheticPoolConfig
from kiln.data_curation.readers import (
    FORMAT_SUFFIXES,
    READ_SCHEMA,
    expand_paths,
    read_file,
)


def _rows(path: str, cfg: InputConfig, max_rows: int | None = None) -> list[dict]:
    return [r for t in read_file(path, cfg, max_rows) for r in t.to_pylist()]


# --------------------------------------------------------------------------- paths


def test_expand_paths_files_folders_globs(tmp_path: Path) -> None:
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "b" / ".cache").mkdir()
    for rel in [
        "b/deep/2.parquet",
        "b/1.parquet",
        "a.parquet",
        "b/notes.txt",
        "b/_SUCCESS",
        "b/.cache/3.parquet",
        "b/_tmp.parquet",
    ]:
        (tmp_path / rel).write_bytes(b"x")
    got = expand_paths(
        [str(tmp_path / "b"), str(tmp_path / "*.parquet"), str(tmp_path / "b/1.parquet")],
        [".parquet"],
    )
    assert got == [
        str(tmp_path / "b/1.parquet"),
        str(tmp_path / "b/deep/2.parquet"),
        str(tmp_path / "a.parquet"),
    ]
    # An explicitly named file is read whatever its suffix.
    assert expand_paths([str(tmp_path / "b/notes.txt")], [".parquet"]) == [
        str(tmp_path / "b/notes.txt")
    ]


def test_expand_paths_missing_paths_are_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match=re.escape("nope.parquet")):
        expand_paths([missing], [".parquet"])
    with pytest.raises(FileNotFoundError, match="matches no files"):
        expand_paths([str(tmp_path / "*.parquet")], [".parquet"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape("holds no files ending in .parquet")):
        expand_paths([str(tmp_path / "empty")], [".parquet"])


def test_expand_paths_on_fsspec_urls() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/kiln-readers-test/x/1.jsonl", b'{"text": "a"}\n')
    fs.pipe("/kiln-readers-test/x/0.jsonl", b'{"text": "b"}\n')
    got = expand_paths(["memory://kiln-readers-test/x"], FORMAT_SUFFIXES["jsonl"])
    assert got == ["memory:///kiln-readers-test/x/0.jsonl", "memory:///kiln-readers-test/x/1.jsonl"]
    cfg = InputConfig(format="jsonl", paths=got, url_column=None)
    assert [r["text"] for p in got for r in _rows(p, cfg)] == ["b", "a"]


# --------------------------------------------------------------------------- formats


def test_parquet_laion_alttext(shared_data: Path) -> None:
    path = str(shared_data / "laion_alttext" / "test_1000.parquet")
    cfg = InputConfig(format="parquet", paths=[path], text_column="TEXT", url_column="URL")
    tables = list(read_file(path, cfg))
    assert all(t.schema == READ_SCHEMA for t in tables)
    rows = [r for t in tables for r in t.to_pylist()]
    raw = pq.read_table(path).to_pylist()
    assert len(rows) == len(raw) == 1000
    for i in (0, 17, 999):
        assert rows[i]["text"] == raw[i]["TEXT"]
        assert rows[i]["url"] == raw[i]["URL"]
        assert rows[i]["uid"] == make_uid(raw[i]["URL"], raw[i]["TEXT"])
        assert rows[i]["source"] == path and rows[i]["source_row"] == i
        assert rows[i]["image"] is None
    assert len(_rows(path, cfg, max_rows=10)) == 10


def test_missing_column_names_column_file_and_columns(shared_data: Path) -> None:
    path = str(shared_data / "laion_alttext" / "test_1000.parquet")
    cfg = InputConfig(format="parquet", paths=[path], text_column="caption", url_column="URL")
    with pytest.raises(ValueError, match="caption") as e:
        list(read_file(path, cfg))
    assert path in str(e.value) and "TEXT, URL" in str(e.value)
    cfg = InputConfig(format="parquet", paths=[path], text_column="TEXT")  # url_column="url"
    with pytest.raises(ValueError, match=re.escape("input.url_column='url'")):
        list(read_file(path, cfg))


def test_csv_with_image_folder(shared_data: Path, tmp_path: Path) -> None:
    flickr = shared_data / "flickr8k_1k"
    lines = (flickr / "captions.csv").read_text().splitlines()
    lines.append("no_such_image.jpg,A caption whose image file is missing .")
    lines.append("1000268201_693b08cb0e.jpg,")  # empty caption
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text("\n".join(lines[:6] + lines[-2:]) + "\n")
    cfg = InputConfig(
        format="csv",
        paths=[str(csv_path)],
        text_column="caption",
        url_column=None,
        image_dir=str(flickr / "images"),
        image_path_column="image",
    )
    rows = _rows(str(csv_path), cfg)
    assert len(rows) == 7
    first_image = (flickr / "images" / "1000268201_693b08cb0e.jpg").read_bytes()
    assert rows[0]["image"] == first_image
    assert rows[0]["url"] == "1000268201_693b08cb0e.jpg"  # locator: path relative to image_dir
    assert rows[0]["uid"] == make_uid("1000268201_693b08cb0e.jpg", rows[0]["text"])
    assert rows[5]["url"] == "no_such_image.jpg" and rows[5]["image"] is None
    assert rows[6]["text"] == "" and rows[6]["image"] == first_image
    assert len({r["uid"] for r in rows[:5]}) == 5


def test_jsonl_non_string_captions_survive_as_null(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    records = [
        {"text": "a red dog", "url": "u0"},
        {"text": 42, "url": "u1"},
        {"text": None, "url": "u2"},
        {"text": ["a", "list"], "url": "u3"},
        {"url": "u4"},
        {"text": "", "url": 7},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    cfg = InputConfig(format="jsonl", paths=[str(path)])
    rows = _rows(str(path), cfg)
    assert [r["text"] for r in rows] == ["a red dog", None, None, None, None, ""]
    assert [r["url"] for r in rows] == ["u0", "u1", "u2", "u3", "u4", None]
    assert [r["source_row"] for r in rows] == list(range(6))
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="line 2"):
        _rows(str(path), InputConfig(format="jsonl", paths=[str(path)], url_column=None))


def test_parquet_non_string_text_column_is_null(tmp_path: Path) -> None:
    path = tmp_path / "nums.parquet"
    pq.write_table(pa.table({"text": [1, 2], "url": ["a", "b"], "id": [10, 11]}), path)
    cfg = InputConfig(format="parquet", paths=[str(path)], uid_column="id")
    rows = _rows(str(path), cfg)
    assert [r["text"] for r in rows] == [None, None]
    assert [r["uid"] for r in rows] == ["10", "11"]


def test_webdataset_real_img2dataset_shard(shared_data: Path) -> None:
    path = str(shared_data / "cc12m_wds_shard" / "cc12m-train-0000.tar")
    cfg = InputConfig(format="webdataset", paths=[path])
    rows = _rows(path, cfg)
    assert len(rows) == 32
    assert all(r["image"] and r["image"][:2] == b"\xff\xd8" for r in rows)  # JPEG bytes
    assert all(r["url"].startswith("http") for r in rows)
    first = rows[0]
    assert first["text"] == "Red Square is a city square in Moscow, Russia."
    assert first["uid"] == make_uid(first["url"], first["text"])
    keyed = _rows(path, InputConfig(format="webdataset", paths=[path], uid_column="__key__"))
    assert keyed[0]["uid"] == "000000003"
    by_json = _rows(path, InputConfig(format="webdataset", paths=[path], uid_column="key"))
    assert [r["uid"] for r in by_json] == [r["uid"] for r in keyed]


def test_webdataset_odd_members_do_not_crash(shared_data: Path) -> None:
    files = expand_paths([str(shared_data / "webdataset_testdata")], FORMAT_SUFFIXES["webdataset"])
    cfg = InputConfig(format="webdataset", paths=files)
    got = {Path(f).name: _rows(f, cfg) for f in files}
    assert {k: len(v) for k, v in got.items()} == {
        "compressed.tar": 3,
        "mpdata.tar": 100,
        "sample.tgz": 90,
        "tendata.tar": 100,
        "testgz.tar": 1000,
    }
    # png + cls: an image and no caption; txt.gz: decompressed caption; msgpack / tensors: neither.
    assert all(
        r["image"] and r["image"][:4] == b"\x89PNG" and r["text"] is None for r in got["sample.tgz"]
    )
    assert all(isinstance(r["text"], str) and r["image"] is None for r in got["compressed.tar"])
    assert all(r["text"] is None and r["image"] is None for r in got["tendata.tar"])


def test_not_a_tar_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.tar"
    path.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ValueError, match=re.escape("broken.tar")):
        _rows(str(path), InputConfig(format="webdataset", paths=[str(path)]))


@pytest.mark.parametrize(
    ("fmt", "name", "content"),
    [
        ("parquet", "pool.parquet", b"not parquet at all"),
        ("jsonl", "pool.jsonl", b'{"text": "ok"}\n{"text": "tor'),
        ("csv", "pool.csv", b'text\nok\n"a quote left open\nmore\n'),
    ],
)
def test_corrupt_file_is_an_error_naming_it(
    tmp_path: Path, fmt: str, name: str, content: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    cfg = InputConfig(format=fmt, paths=[str(path)], url_column=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape(str(path))):
        _rows(str(path), cfg)


# --------------------------------------------------------------------------- read_pool on Ray


def _split_laion(shared_data: Path, out: Path, parts: int = 3, rows: int = 90) -> list[str]:
    table = pq.read_table(shared_data / "laion_alttext" / "test_1000.parquet").slice(0, rows)
    size = rows // parts
    files = []
    for i in range(parts):
        f = out / f"part-{i}.parquet"
        pq.write_table(table.slice(i * size, size), f)
        files.append(str(f))
    return files


def test_read_pool_is_deterministic_with_limit(
    ray_session: None, shared_data: Path, tmp_path: Path
) -> None:
    files = _split_laion(shared_data, tmp_path)
    cfg = InputConfig(format="parquet", paths=[str(tmp_path)], text_column="TEXT", url_column="URL")
    expected = [r["uid"] for f in files for r in _rows(f, cfg)]
    ds = read_pool(cfg)
    table = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    assert table.column("uid").to_pylist() == expected
    assert set(SAMPLE_SCHEMA.names) <= set(table.column_names)
    assert [table.schema.field(n).type for n in SAMPLE_SCHEMA.names] == [
        f.type for f in SAMPLE_SCHEMA
    ]
    limited = InputConfig(
        format="parquet", paths=[str(tmp_path)], text_column="TEXT", url_column="URL", limit=45
    )
    for _ in range(2):
        got = [r["uid"] for r in read_pool(limited).take_all()]
        assert got == expected[:45]


def test_read_pool_missing_path(ray_session: None, tmp_path: Path) -> None:
    cfg = InputConfig(format="csv", paths=[str(tmp_path / "missing.csv")])
    with pytest.raises(FileNotFoundError, match=re.escape("missing.csv")):
        read_pool(cfg)


def test_read_pool_synthetic_generates_then_reads(ray_session: None, tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    cfg = InputConfig(
        format="synthetic",
        paths=[str(pool)],
        synthetic=SyntheticPoolConfig(num_samples=60, num_eval=10, rows_per_file=25),
    )
    rows = read_pool(cfg).take_all()
    assert (pool / "_SUCCESS").exists() and (pool / "metadata.txt").exists()
    assert len(rows) == 60
    assert sorted({r["source"] for r in rows}) == sorted(
        str(p) for p in pool.glob("pool-*.parquet")
    )
    assert sum(r["image"] is not None for r in rows) >= 55
