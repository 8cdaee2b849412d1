"""Image bytes beside the rows, so steps that do not touch images never copy them.

The read step stores each task's image bytes once, in a blob file
(`steps/read/blobs/part-{task}.arrow`: an uncompressed Arrow IPC file with one `image`
column, so a reader memory-maps it and gets the bytes without a copy), and every row carries a
reference instead: `_image_file` (the blob file's URL, null for a row without an image) and
`_image_row` (the row in it). Stages see the `image` column only when they declare
`images = True` (the image stage): the runner loads the bytes for their batches and stores
only the images they changed (re-encoded, resized) in the step's own blob file; an image the
stage passed through keeps its old reference. The shard step loads the bytes once more to
write the tars. So an image is written at most three times (read, re-encode, shard) however
many stages the plan has.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kiln import storage

__all__ = [
    "IMAGE_FILE",
    "IMAGE_ROW",
    "BlobWriter",
    "blob_stats",
    "load_images",
    "split_images",
    "store_changed",
]

IMAGE_FILE = "_image_file"
IMAGE_ROW = "_image_row"
_SCHEMA = pa.schema([("image", pa.binary())])


class BlobWriter:
    """A blob file being written (temporary name until `close`); rows numbered from 0.

    An image equal to the one stored just before it is not stored again: it gets the same
    row (a caption table lists each photo once per caption, in a row)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.rows = 0
        self._file: Any = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._last: bytes | None = None

    def put(self, images: pa.Array) -> np.ndarray:
        """Append `images` (no nulls); returns the row each of them is stored at."""
        images = images.cast(pa.binary())
        n = len(images)
        if n == 0:
            return np.zeros(0, np.int64)
        repeat = np.zeros(n, dtype=bool)
        if n > 1:
            same = pc.equal(images.slice(1), images.slice(0, n - 1)).fill_null(False)
            repeat[1:] = np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool)
        repeat[0] = self._last is not None and images[0].as_py() == self._last
        fresh = ~repeat
        if fresh.any():
            if self._writer is None:
                self._file = storage.AtomicFile(self.url)
                self._writer = pa.ipc.new_file(self._file.file, _SCHEMA)
            self._writer.write_table(pa.table({"image": images.filter(pa.array(fresh))}))
        rows = self.rows - 1 + np.cumsum(fresh)  # a repeat gets the row of the one before
        self.rows += int(fresh.sum())
        self._last = images[n - 1].as_py()
        return rows.astype(np.int64)

    def close(self) -> None:
        if self._writer is None:
            storage.remove(self.url)  # an earlier attempt's file, if any
            return
        self._writer.close()
        self._file.commit()


def _refs(n: int, url: str, mask: np.ndarray, rows: np.ndarray) -> tuple[pa.Array, pa.Array]:
    files = pa.array([url if m else None for m in mask.tolist()], pa.string())
    full = np.zeros(n, dtype=np.int64)
    full[mask] = rows
    return files, pa.array(full, pa.int64(), mask=~mask)


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, values) if i >= 0 else table.append_column(name, values)


def split_images(table: pa.Table, writer: BlobWriter) -> pa.Table:
    """`table` without its `image` column: the bytes go to `writer`, the rows get refs."""
    if "image" not in table.column_names:
        return table
    images = table.column("image").combine_chunks()
    mask = np.asarray(images.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    rows = writer.put(images.filter(pa.array(mask))) if mask.any() else np.zeros(0, np.int64)
    files, refs = _refs(table.num_rows, writer.url, mask, rows)
    table = table.drop_columns(["image"])
    return _set(_set(table, IMAGE_FILE, files), IMAGE_ROW, refs)


@contextlib.contextmanager
def _open_blobs(url: str) -> Iterator[pa.ipc.RecordBatchFileReader]:
    fs, path = storage.fs_path(url)
    if storage.is_local(fs):
        yield pa.ipc.open_file(pa.memory_map(path))  # batches are views of the mapping
    else:
        with fs.open(path, "rb") as f:
            yield pa.ipc.open_file(f)


@functools.lru_cache(maxsize=256)
def _batch_starts(url: str, size: Any, mtime: str) -> np.ndarray:
    with _open_blobs(url) as reader:
        sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def blob_stats(url: str) -> tuple[int, int]:
    """(images, bytes on disk) of blob file `url`."""
    version = storage.file_version(url)
    return int(_batch_starts(url, *version)[-1]), int(version[0] or 0)


def _read_rows(url: str, rows: np.ndarray) -> pa.ChunkedArray:
    """The images at `rows` of blob file `url`, reading only the batches holding them (a
    local file is memory-mapped: every row read, in order, comes back without a copy)."""
    starts = _batch_starts(url, *storage.file_version(url))
    groups = np.searchsorted(starts, rows, side="right") - 1
    wanted = np.unique(groups)
    with _open_blobs(url) as reader:
        got = pa.chunked_array(
            [reader.get_batch(int(g)).column(0) for g in wanted.tolist()], pa.binary()
        )
    sizes = starts[wanted + 1] - starts[wanted]
    base = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    local = base[np.searchsorted(wanted, groups)] + (rows - starts[groups])
    if local.size == len(got) and (local == np.arange(local.size)).all():
        return got  # every row read, in order: no gather
    return got.take(pa.array(local))


def load_images(table: pa.Table) -> pa.Table:
    """`table` with its `image` column read back from the blob files (refs dropped)."""
    if IMAGE_FILE not in table.column_names:
        return table
    files = table.column(IMAGE_FILE).combine_chunks()
    rows = table.column(IMAGE_ROW).combine_chunks().fill_null(0).to_numpy()
    encoded = pc.dictionary_encode(files)
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    pieces: list[pa.ChunkedArray] = []
    where: list[np.ndarray] = []
    for k, url in enumerate(encoded.dictionary.to_pylist()):
        sel = np.flatnonzero(codes == k)
        pieces.append(_read_rows(url, rows[sel]))
        where.append(sel)
    n = table.num_rows
    index = np.zeros(n, dtype=np.int64)
    if pieces:
        order = np.concatenate(where)
        index[order] = np.arange(order.size)
        values = pa.chunked_array([c for p in pieces for c in p.chunks], pa.binary())
    else:
        values = pa.chunked_array([], pa.binary())
    if len(values) == n and (codes >= 0).all() and (index == np.arange(n)).all():
        images = values  # one row per image, already in table order: no gather
    else:
        images = values.take(pa.array(index, mask=codes < 0)) if n else values
    table = table.drop_columns([IMAGE_FILE, IMAGE_ROW])
    return _set(table, "image", images)


def store_changed(
    before: pa.Array, after: pa.Table, writer: BlobWriter, refs: pa.Table
) -> pa.Table:
    """`after` (a stage's output, row-aligned with `before`, the images it was given) without
    its `image` column: unchanged images keep their refs (`refs`: the input's two ref
    columns), changed ones are stored by `writer`, removed ones get null refs."""
    out = after.column("image").combine_chunks().cast(pa.binary())
    same = pc.equal(out, before.cast(pa.binary()))
    both_null = pc.and_(pc.is_null(out), pc.is_null(before))
    unchanged = np.asarray(
        pc.or_(same.fill_null(False), both_null).to_numpy(zero_copy_only=False), dtype=bool
    )
    new = ~unchanged & np.asarray(out.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    rows = writer.put(out.filter(pa.array(new))) if new.any() else np.zeros(0, np.int64)
    new_files, new_rows = _refs(after.num_rows, writer.url, new, rows)
    keep = pa.array(unchanged)
    files = pc.if_else(keep, refs.column(IMAGE_FILE).combine_chunks(), new_files)
    row_refs = pc.if_else(keep, refs.column(IMAGE_ROW).combine_chunks(), new_rows)
    after = after.drop_columns(["image"])
    return _set(_set(after, IMAGE_FILE, files), IMAGE_ROW, row_refs)
