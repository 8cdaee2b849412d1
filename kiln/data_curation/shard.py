"""WebDataset shard writer: sorted sample tables -> `shards/{index:06d}.tar` + `manifest.json`.

Each sample becomes `{uid}.jpg` (when it has an image), `{uid}.txt` (the caption, UTF-8) and
`{uid}.json` (every other scalar / list column: uid, url, width, height, source, entry_ids,
keep_prob, image_sha256, ...; keys sorted). Tar headers carry nothing about the machine or
the clock (mtime 0, uid/gid 0, empty user/group names, mode 0o644, GNU format), members are
written in a fixed order, and the JSON is canonical, so the same rows give byte-identical
shards: the manifest's sha256s double as a reproducibility check.

Shards are written to a temporary name and renamed, so a crash never leaves a half-written
tar under a final name; shards left over from an earlier, larger run are removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

import fsspec
import pyarrow as pa

from kiln.contracts import DatasetManifest, ShardInfo, json_sha256, write_manifest

__all__ = [
    "SHARD_DIR",
    "sample_json",
    "shard_name",
    "write_shards",
]

SHARD_DIR = "shards"

#: Columns that never go into a sample's JSON: stored as their own member, or internal.
_NOT_IN_JSON = frozenset({"image", "text", "drop_reason"})


def shard_name(index: int) -> str:
    """Path of shard `index` relative to the dataset folder."""
    return f"{SHARD_DIR}/{index:06d}.tar"


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


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


def sample_json(row: dict[str, Any], columns: Iterable[str]) -> bytes:
    """The `{uid}.json` member of a row: the given columns, keys sorted, UTF-8."""
    doc = {c: _json_value(row.get(c)) for c in columns}
    return (json.dumps(doc, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _check_uid(uid: Any, previous: str | None) -> str:
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


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class _HashingWriter(io.RawIOBase):
    """Write-only file wrapper that hashes and counts the bytes going through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        b = bytes(data)
        self._f.write(b)
        self.sha.update(b)
        self.size += len(b)
        return len(b)


class _ShardWriter:
    """One tar being written: temp name while open, renamed by `close`."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, index: int) -> None:
        self.fs = fs
        self.rel = shard_name(index)
        self.final = f"{root}/{self.rel}"
        self.tmp = f"{self.final}.tmp"
        self._file = fs.open(self.tmp, "wb")
        self._hash = _HashingWriter(self._file)
        # Held open across `add` calls and closed in `close`, so no `with` block here.
        self._tar = tarfile.open(  # noqa: SIM115
            fileobj=self._hash, mode="w|", format=tarfile.GNU_FORMAT
        )
        self.count = 0

    def add(self, name: str, data: bytes) -> None:
        self._tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))

    def close(self) -> ShardInfo:
        self._tar.close()
        self._file.close()
        self.fs.mv(self.tmp, self.final)
        return ShardInfo(
            path=self.rel,
            num_samples=self.count,
            bytes=self._hash.size,
            sha256=self._hash.sha.hexdigest(),
        )


def _rows(tables: Iterable[pa.Table]) -> Iterator[tuple[dict[str, Any], list[str]]]:
    for table in tables:
        columns = _json_columns(table.schema)
        for row in table.to_pylist():
            yield row, columns


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
    writer: _ShardWriter | None = None
    previous: str | None = None
    total = 0
    for row, columns in _rows(tables):
        uid = _check_uid(row.get("uid"), previous)
        previous = uid
        if writer is None:
            writer = _ShardWriter(fs, root, len(shards))
        image = row.get("image")
        if image:
            writer.add(f"{uid}.jpg", bytes(image))
        text = row.get("text")
        writer.add(f"{uid}.txt", (text if isinstance(text, str) else "").encode())
        writer.add(f"{uid}.json", sample_json(row, columns))
        writer.count += 1
        total += 1
        if writer.count >= samples_per_shard:
            shards.append(writer.close())
            writer = None
    if writer is not None:
        shards.append(writer.close())
    _remove_stale(fs, root, {s.path for s in shards})
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


def _remove_stale(fs: fsspec.AbstractFileSystem, root: str, keep: set[str]) -> None:
    """Delete shards (and temp files) under `root/shards` that this write did not produce."""
    for path in fs.ls(f"{root}/{SHARD_DIR}", detail=False):
        rel = f"{SHARD_DIR}/{path.rstrip('/').rsplit('/', 1)[-1]}"
        if rel not in keep:
            fs.rm(path)
