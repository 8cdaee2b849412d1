"""WebDataset shard writer: sorted sample tables -> `shards/{index:06d}.tar` + `manifest.json`.

Each sample becomes `{uid}.jpg` (when it has an image), `{uid}.txt` (the caption, UTF-8) and
`{uid}.json` (every other scalar / list column: uid, url, width, height, source, entry_ids,
keep_prob, image_sha256, ...; compact JSON, keys sorted). Tar headers carry nothing about the machine or
the clock (mtime 0, uid/gid 0, empty user/group names, mode 0o644, GNU format), members are
written in a fixed order, and the JSON is canonical, so the same rows give byte-identical
shards: the manifest's sha256s double as a reproducibility check.

Shards are written to a temporary name and renamed, so a crash never leaves a half-written
tar under a final name; shards left over from an earlier, larger run are removed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from kiln import storage
from kiln.contracts import DatasetManifest, ShardInfo, binary_buffers, json_sha256, write_manifest
from kiln.storage import tar_end, tar_member

__all__ = [
    "ENCODE_ROWS",
    "SHARD_DIR",
    "ShardFile",
    "check_uid",
    "check_uids",
    "encode_samples",
    "remove_stale_shards",
    "sample_columns",
    "sample_json",
    "sample_records",
    "shard_name",
    "uid_problem",
    "write_shards",
]

SHARD_DIR = "shards"
#: rows `encode_samples` is given at a time by the writers: bounds its buffers (~20 MB for
#: captions) and keeps them in cache; larger blocks are slower, not faster
ENCODE_ROWS = 4096

#: Columns that never go into a sample's JSON: stored as their own member, or internal.
_NOT_IN_JSON = frozenset({"image", "text", "drop_reason"})


def shard_name(index: int) -> str:
    """Path of shard `index` relative to the dataset folder."""
    return f"{SHARD_DIR}/{index:06d}.tar"


def _json_columns(schema: pa.Schema) -> list[str]:
    """Columns of `schema` that go into the sample JSON: scalars and lists of scalars."""
    out = []
    for field in schema:
        if field.name in _NOT_IN_JSON or field.name.startswith("_"):
            continue
        t = field.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_struct(t):
            continue
        if pa.types.is_fixed_size_list(t):
            continue  # embeddings: too large for a per-sample JSON
        out.append(field.name)
    return out


_JSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE


def sample_json(row: dict[str, Any], columns: Iterable[str]) -> bytes:
    """The `{uid}.json` member of a row: the given columns as compact UTF-8 JSON, keys
    sorted, NaN and infinities as null, one line."""
    return orjson.dumps({c: row.get(c) for c in columns}, option=_JSON_OPTIONS)


def uid_problem(uid: Any) -> str | None:
    """Why `uid` cannot name a sample in a shard (None: it can): it must be a non-empty
    string without '.', '/' or '\\' (WebDataset splits member names at the first dot)."""
    if not isinstance(uid, str) or not uid:
        return "is not a non-empty string: every row needs a uid"
    if "." in uid or "/" in uid or "\\" in uid:
        return (
            "contains '.', '/' or '\\': WebDataset splits member names at the first dot, so "
            "uids must be plain ids"
        )
    return None


def check_uid(uid: Any, previous: str | None) -> str:
    """`uid` if it is a plain id that sorts after `previous` (rows sorted, uids unique)."""
    problem = uid_problem(uid)
    if problem is not None:
        raise ValueError(f"sample uid {uid!r} {problem} (use the default uid, sha256 of url+text)")
    if previous is not None and uid <= previous:
        what = "appears twice" if uid == previous else f"comes after {previous!r}"
        raise ValueError(
            f"sample uid {uid!r} {what}: write_shards needs rows sorted by uid with unique "
            "uids (sort with ds.sort('uid'); duplicate source uids need input.uid_column unset)"
        )
    return uid


_BLOCK = 512  # a tar block (`kiln.storage.tar_member` writes the headers)


def sample_columns(schema: pa.Schema) -> list[str]:
    """Columns of `schema` that go into each sample's JSON member."""
    return _json_columns(schema)


def sample_records(table: pa.Table) -> Iterator[tuple[str, bytes]]:
    """(uid, the sample's tar members as bytes) per row, in table order: `{uid}.jpg` when
    it has an image, `{uid}.txt` (the caption, UTF-8; empty when null), `{uid}.json`.

    The per-row reference for `encode_samples`, which writes the same bytes for a whole
    block of rows at once."""
    columns = _json_columns(table.schema)
    for row in table.to_pylist():
        uid = row.get("uid")
        if not isinstance(uid, str):
            raise ValueError(f"sample uid {uid!r} is not a non-empty string: every row needs a uid")
        parts = []
        image = row.get("image")
        if image:
            parts.append(tar_member(f"{uid}.jpg", bytes(image)))
        text = row.get("text")
        parts.append(tar_member(f"{uid}.txt", (text if isinstance(text, str) else "").encode()))
        parts.append(tar_member(f"{uid}.json", sample_json(row, columns)))
        yield uid, b"".join(parts)


_TEMPLATE = np.frombuffer(tar_member("", b"")[:_BLOCK], np.uint8).copy()
_TEMPLATE[148:156] = ord(" ")  # the checksum is summed with its own field as spaces
_EXTS = np.frombuffer(b".jpg.txt.json", np.uint8)
_EXT_START = np.array([0, 4, 8], np.int64)
_EXT_LEN = np.array([4, 4, 5], np.int64)
_OCTAL_11 = 3 * np.arange(10, -1, -1, dtype=np.int64)
_OCTAL_6 = 3 * np.arange(5, -1, -1, dtype=np.int64)


def _scatter(
    out: np.ndarray, dest: np.ndarray, src: np.ndarray, src_starts: np.ndarray, lens: np.ndarray
) -> None:
    """out[dest[i] : dest[i] + lens[i]] = src[src_starts[i] : ... + lens[i]] for every i."""
    total = int(lens.sum())
    if total == 0:
        return
    packed = np.cumsum(lens) - lens  # where each piece starts in `src` if src is packed
    if np.array_equal(src_starts, packed):  # src holds exactly the pieces, in order
        out[np.arange(total, dtype=np.int64) + np.repeat(dest - packed, lens)] = src[:total]
        return
    within = np.arange(total, dtype=np.int64) - np.repeat(packed, lens)
    out[np.repeat(dest, lens) + within] = src[np.repeat(src_starts, lens) + within]


def check_uids(uids: pa.Array, previous: str | None = None) -> str:
    """The last uid, after checking every uid as `check_uid` does (same errors): all plain
    ids, strictly ascending from `previous`."""
    if uids.null_count or not pa.types.is_string(uids.type):
        bad = next(u for u in uids.to_pylist() if not isinstance(u, str))
        check_uid(bad, None)
    first = uids[0].as_py()
    check_uid(first, previous)
    empty_or_bad = pc.or_(
        pc.equal(pc.binary_length(uids), 0), pc.match_substring_regex(uids, r"[./\\]")
    )
    if pc.any(empty_or_bad).as_py():
        check_uid(uids.filter(empty_or_bad)[0].as_py(), None)
    n = len(uids)
    if n > 1:
        ascending = pc.greater(uids.slice(1), uids.slice(0, n - 1))
        if not pc.all(ascending).as_py():
            i = int(np.flatnonzero(~np.asarray(ascending.to_numpy(zero_copy_only=False)))[0])
            check_uid(uids[i + 1].as_py(), uids[i].as_py())
    return str(uids[n - 1].as_py())


def encode_samples(
    table: pa.Table, rows: np.ndarray | None = None, *, previous: str | None = None
) -> tuple[list[np.ndarray], str]:
    """The tar members of rows `rows` of `table` (default: all), in that order: the same
    bytes as joining `sample_records` over those rows, built for the whole block at once
    (headers in numpy, no per-row Python except the JSON), as a list of buffers to write
    one after the other -- image bytes are views of the Arrow buffers, never copied.
    Checks the uids as `check_uid` does, starting after `previous`; returns (buffers, the
    last uid)."""
    if rows is None:
        rows = np.arange(table.num_rows, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    n = rows.size
    if n == 0:
        return [], previous or ""
    take = pa.array(rows)
    if "uid" not in table.column_names:
        raise ValueError("rows have no uid column: every row needs a uid")
    uids = table.column("uid").take(take).combine_chunks()
    last = check_uids(uids, previous)
    uid_off, uid_data = binary_buffers(uids)
    uid_len = np.diff(uid_off)

    columns = _json_columns(table.schema)
    if columns:
        small = table.select(columns).take(take)
        values = [small.column(c).to_pylist() for c in columns]
        jsons = [
            orjson.dumps(dict(zip(columns, v, strict=True)), option=_JSON_OPTIONS)
            for v in zip(*values, strict=True)
        ]
    else:
        jsons = [orjson.dumps({}, option=_JSON_OPTIONS)] * n
    json_len = np.fromiter((len(j) for j in jsons), np.int64, n)
    json_data = np.frombuffer(b"".join(jsons), np.uint8)
    json_off = np.cumsum(json_len) - json_len

    text_type = table.schema.field("text").type if "text" in table.column_names else None
    if text_type is not None and (
        pa.types.is_string(text_type) or pa.types.is_large_string(text_type)
    ):
        texts = table.column("text").take(take).combine_chunks().fill_null("")
        text_off, text_data = binary_buffers(texts)
    else:
        text_off, text_data = np.zeros(n + 1, np.int64), np.zeros(0, np.uint8)
    text_len = np.diff(text_off)

    image_len = np.zeros(n, np.int64)
    image_src: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # chunk -> (offsets, bytes)
    image_chunk = np.zeros(n, np.int64)
    image_local = rows
    if "image" in table.column_names and not pa.types.is_null(table.schema.field("image").type):
        chunks = table.column("image").chunks
        sizes = np.array([len(c) for c in chunks], np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        image_chunk = np.searchsorted(starts, rows, side="right") - 1
        image_local = rows - starts[image_chunk]
        for k in np.unique(image_chunk).tolist():
            chunk = chunks[k]
            sel = image_chunk == k
            off, data = binary_buffers(chunk)
            valid = np.asarray(chunk.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
            image_src[k] = (off, data)
            local = image_local[sel]
            image_len[sel] = np.where(valid[local], off[local + 1] - off[local], 0)
    has_image = image_len > 0

    # members in order: per row [jpg,] txt, json
    counts = 2 + has_image.astype(np.int64)
    m = int(counts.sum())
    member_row = np.repeat(np.arange(n, dtype=np.int64), counts)
    kind = np.arange(m, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    kind += (~has_image)[member_row]
    sizes = np.choose(kind, [image_len[member_row], text_len[member_row], json_len[member_row]])
    if (sizes >= 8**11).any():
        raise ValueError("a tar member is 8 GiB or larger, over what a tar header can hold")
    name_len = uid_len[member_row] + _EXT_LEN[kind]
    if (name_len > 100).any():
        j = int(np.flatnonzero(name_len > 100)[0])
        raise ValueError(
            f"tar member name {uids[int(member_row[j])].as_py()!r} plus its extension is over "
            "100 bytes: use shorter uids"
        )

    headers = np.tile(_TEMPLATE, (m, 1))
    flat = headers.reshape(-1)
    base = np.arange(m, dtype=np.int64) * _BLOCK
    width = int(uid_len[0])
    if (uid_len == width).all():  # the usual case: fixed-length hex uids
        headers[:, :width] = uid_data[: n * width].reshape(n, width)[member_row]
        for k in range(3):
            sel = kind == k
            ext = _EXTS[_EXT_START[k] : _EXT_START[k] + _EXT_LEN[k]]
            headers[sel, width : width + _EXT_LEN[k]] = ext
    else:
        _scatter(flat, base, uid_data, uid_off[member_row], uid_len[member_row])
        _scatter(flat, base + uid_len[member_row], _EXTS, _EXT_START[kind], _EXT_LEN[kind])
    headers[:, 124:135] = ((sizes[:, None] >> _OCTAL_11) & 7) + ord("0")
    checksum = headers.sum(axis=1, dtype=np.int64)
    headers[:, 148:154] = ((checksum[:, None] >> _OCTAL_6) & 7) + ord("0")
    headers[:, 154] = 0

    blocks = 1 + (sizes + _BLOCK - 1) // _BLOCK
    first_block = np.cumsum(blocks) - blocks
    out = np.zeros(int(blocks.sum()) * _BLOCK, np.uint8)
    out.reshape(-1, _BLOCK)[first_block] = headers
    data_at = (first_block + 1) * _BLOCK
    is_text, is_json = kind == 1, kind == 2
    _scatter(out, data_at[is_text], text_data, text_off[:-1], text_len)
    _scatter(out, data_at[is_json], json_data, json_off, json_len)
    buffers: list[np.ndarray] = []
    done = 0
    for j in np.flatnonzero(kind == 0).tolist():
        r = int(member_row[j])
        off, data = image_src[int(image_chunk[r])]
        start, at = int(off[image_local[r]]), int(data_at[j])
        buffers += [out[done:at], data[start : start + int(image_len[r])]]
        done = at + int(image_len[r])
    buffers.append(out[done:])
    return buffers, last


class _HashingFile:
    """A file being written atomically (`storage.AtomicFile`), hashed and counted."""

    def __init__(self, url: str) -> None:
        self._out = storage.AtomicFile(url)
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | np.ndarray) -> None:
        self._out.file.write(data)
        self.sha.update(data.data if isinstance(data, np.ndarray) else data)
        self.size += len(data)

    def close(self) -> tuple[int, str]:
        self._out.commit()
        return self.size, self.sha.hexdigest()


class ShardFile:
    """One tar being written: members appended, closed with `tar_end`, renamed into place."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, index: int) -> None:
        self.rel = shard_name(index)
        path = f"{root}/{self.rel}"
        self._out = _HashingFile(path if storage.is_local(fs) else fs.unstrip_protocol(path))
        self.count = 0

    def add(self, record: bytes | list[np.ndarray], samples: int = 1) -> None:
        """Append one record (bytes), or the buffers `encode_samples` returned for
        `samples` rows."""
        for data in record if isinstance(record, list) else [record]:
            self._out.write(data)
        self.count += samples

    def close(self) -> ShardInfo:
        self._out.write(tar_end(self._out.size))
        size, digest = self._out.close()
        return ShardInfo(path=self.rel, num_samples=self.count, bytes=size, sha256=digest)


def write_shards(
    tables: Iterable[pa.Table],
    out_dir: str,
    samples_per_shard: int,
    *,
    name: str = "",
    recipe: dict[str, Any] | None = None,
    inputs: list[str] | None = None,
    stats: dict[str, Any] | None = None,
) -> DatasetManifest:
    """Write the rows of `tables` (sorted by uid, uids unique) as WebDataset tars + manifest.

    `out_dir` is any fsspec URL; shards go to `out_dir/shards/`, the manifest to
    `out_dir/manifest.json` (written last, so a manifest always describes complete shards).
    A row with a null image gets no `.jpg` member (caption-only datasets); a null caption
    is written as an empty `.txt`. Returns the manifest.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}: must be at least 1")
    fs, root = fsspec.core.url_to_fs(out_dir)
    root = root.rstrip("/")
    fs.makedirs(f"{root}/{SHARD_DIR}", exist_ok=True)
    shards: list[ShardInfo] = []
    writer: ShardFile | None = None
    previous: str | None = None
    total = 0
    for table in tables:
        pos = 0
        while pos < table.num_rows:
            if writer is None:
                writer = ShardFile(fs, root, len(shards))
            take = min(samples_per_shard - writer.count, table.num_rows - pos, ENCODE_ROWS)
            data, previous = encode_samples(table, np.arange(pos, pos + take), previous=previous)
            writer.add(data, take)
            total += take
            pos += take
            if writer.count >= samples_per_shard:
                shards.append(writer.close())
                writer = None
    if writer is not None:
        shards.append(writer.close())
    remove_stale_shards(fs, root, {s.path for s in shards})
    recipe = dict(recipe or {})
    manifest = DatasetManifest(
        name=name,
        num_samples=total,
        shards=shards,
        recipe=recipe,
        recipe_hash=json_sha256(recipe),
        inputs=list(inputs or []),
        stats=dict(stats or {}),
    )
    write_manifest(out_dir, manifest)
    return manifest


def remove_stale_shards(fs: fsspec.AbstractFileSystem, root: str, keep: set[str]) -> None:
    """Delete shards (and temp files) under `root/shards` that this write did not produce."""
    for path in fs.ls(f"{root}/{SHARD_DIR}", detail=False):
        rel = f"{SHARD_DIR}/{path.rstrip('/').rsplit('/', 1)[-1]}"
        if rel not in keep:
            fs.rm(path)
