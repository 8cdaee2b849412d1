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
import orjson
import pyarrow as pa

from kiln.contracts import DatasetManifest, ShardInfo, json_sha256, write_manifest

__all__ = [
    "SHARD_DIR",
    "ShardFile",
    "check_uid",
    "remove_stale_shards",
    "sample_columns",
    "sample_json",
    "sample_records",
    "shard_name",
    "tar_end",
    "tar_member",
    "write_shards",
]

SHARD_DIR = "shards"

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


def check_uid(uid: Any, previous: str | None) -> str:
    """`uid` if it is a plain id that sorts after `previous` (rows sorted, uids unique)."""
    if not isinstance(uid, str) or not uid:
        raise ValueError(f"sample uid {uid!r} is not a non-empty string: every row needs a uid")
    if "." in uid or "/" in uid or "\\" in uid:
        raise ValueError(
            f"sample uid {uid!r} contains '.', '/' or '\\': WebDataset splits member names at "
            "the first dot, so uids must be plain ids (use the default uid, sha256 of url+text)"
        )
    if previous is not None and uid <= previous:
        what = "appears twice" if uid == previous else f"comes after {previous!r}"
        raise ValueError(
            f"sample uid {uid!r} {what}: write_shards needs rows sorted by uid with unique "
            "uids (sort with ds.sort('uid'); duplicate source uids need input.uid_column unset)"
        )
    return uid


_BLOCK = 512
_RECORD = 20 * _BLOCK
_HEAD = b"0000644\x00" + b"0000000\x00" * 2  # mode, uid, gid
_MTIME = b"00000000000\x00"
_TAIL = b"0" + b"\x00" * 100 + b"ustar  \x00" + b"\x00" * (32 + 32 + 8 + 8 + 155 + 12)


_FIXED_SUM = sum(_HEAD) + sum(_MTIME) + sum(b" " * 8) + sum(_TAIL)


def tar_member(name: str, data: bytes) -> bytes:
    """One regular-file tar member (GNU header + data + NUL padding to 512 bytes).

    The header carries nothing about the machine or the clock: mode 0644, uid/gid 0, mtime
    0, empty user/group names; it is the same bytes Python's `tarfile` writes for those
    fields in GNU format, built directly (the checksum from the few fields that vary)
    because `TarInfo.tobuf` costs ~10x more per member.
    """
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"tar member name {name!r} is over 100 bytes: use shorter uids")
    size = len(data)
    size_field = b"%011o\x00" % size
    checksum = b"%06o\x00 " % (_FIXED_SUM + sum(raw) + sum(size_field))
    header = raw.ljust(100, b"\x00") + _HEAD + size_field + _MTIME + checksum + _TAIL
    return header + data + b"\x00" * (-size % _BLOCK)


def tar_end(length: int) -> bytes:
    """What closes a tar stream of `length` member bytes: two zero blocks, then zeros up to
    the next 10240-byte record (as `tarfile` and GNU tar write it)."""
    end = length + 2 * _BLOCK
    return b"\x00" * (2 * _BLOCK + (-end % _RECORD))


def sample_columns(schema: pa.Schema) -> list[str]:
    """Columns of `schema` that go into each sample's JSON member."""
    return _json_columns(schema)


def sample_records(table: pa.Table) -> Iterator[tuple[str, bytes]]:
    """(uid, the sample's tar members as bytes) per row, in table order: `{uid}.jpg` when
    it has an image, `{uid}.txt` (the caption, UTF-8; empty when null), `{uid}.json`."""
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


class _HashingFile:
    """A file being written under a temporary name, hashed and counted; renamed by `close`."""

    def __init__(self, fs: fsspec.AbstractFileSystem, final: str) -> None:
        self.fs = fs
        self.final = final
        self.tmp = f"{final}.tmp"
        self._file = fs.open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.sha.update(data)
        self.size += len(data)

    def close(self) -> tuple[int, str]:
        self._file.close()
        self.fs.mv(self.tmp, self.final)
        return self.size, self.sha.hexdigest()


class ShardFile:
    """One tar being written: members appended, closed with `tar_end`, renamed into place."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, index: int) -> None:
        self.rel = shard_name(index)
        self._out = _HashingFile(fs, f"{root}/{self.rel}")
        self.count = 0

    def add(self, record: bytes, samples: int = 1) -> None:
        self._out.write(record)
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
        for uid, record in sample_records(table):
            previous = check_uid(uid, previous)
            if writer is None:
                writer = ShardFile(fs, root, len(shards))
            writer.add(record)
            total += 1
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
