"""Image bytes beside the rows: stored once, loaded back exactly, changed ones only rewritten."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from kiln.data_curation.blobs import (
    IMAGE_FILE,
    IMAGE_ROW,
    BlobWriter,
    load_images,
    split_images,
    store_changed,
)


def _table(images: list[bytes | None]) -> pa.Table:
    return pa.table(
        {"uid": [f"u{i}" for i in range(len(images))], "image": pa.array(images, pa.binary())}
    )


def test_split_then_load_gives_back_the_same_bytes(tmp_path: Path) -> None:
    images = [b"a" * 10, b"a" * 10, None, b"b", b"b", b"c", None]
    writer = BlobWriter(str(tmp_path / "blobs" / "part-0.arrow"))
    light = split_images(_table(images[:4]), writer)
    light2 = split_images(_table(images[4:]), writer)
    writer.close()
    assert "image" not in light.column_names
    assert light.column(IMAGE_ROW).to_pylist() == [0, 0, None, 1]
    assert light2.column(IMAGE_ROW).to_pylist() == [1, 2, None]  # b"b" repeats across batches
    assert writer.rows == 3  # a, b, c stored once each
    both = pa.concat_tables([light, light2])
    back = load_images(both.take(pa.array([6, 5, 0, 3, 2, 1, 4])))
    assert back.column("image").to_pylist() == [None, b"c", b"a" * 10, b"b", None, b"a" * 10, b"b"]
    assert IMAGE_FILE not in back.column_names
    assert load_images(pa.table({"uid": ["x"]})).column_names == ["uid"]


def test_store_changed_rewrites_only_changed_images(tmp_path: Path) -> None:
    first = BlobWriter(str(tmp_path / "read.arrow"))
    light = split_images(_table([b"keep", b"resize me", b"drop me"]), first)
    first.close()
    given = load_images(light)
    after = given.set_column(1, "image", pa.array([b"keep", b"small", None], pa.binary()))
    second = BlobWriter(str(tmp_path / "image.arrow"))
    out = store_changed(given.column("image"), after, second, light.select([IMAGE_FILE, IMAGE_ROW]))
    second.close()
    assert second.rows == 1
    files = out.column(IMAGE_FILE).to_pylist()
    assert files[0] == str(tmp_path / "read.arrow") and files[1] == str(tmp_path / "image.arrow")
    assert files[2] is None
    assert load_images(out).column("image").to_pylist() == [b"keep", b"small", None]


def test_a_writer_with_nothing_to_store_leaves_no_file(tmp_path: Path) -> None:
    writer = BlobWriter(str(tmp_path / "b.arrow"))
    (tmp_path / "b.arrow").write_bytes(b"stale")
    out = split_images(_table([None, None]), writer)
    writer.close()
    assert not (tmp_path / "b.arrow").exists()
    assert out.column(IMAGE_FILE).to_pylist() == [None, None]
