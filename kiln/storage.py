"""The one fsspec layer for files kiln writes and reads back: atomic writes, JSON, listing.

Every helper takes a URL (a local path, `memory://`, `s3://`, ...). Writes go to a temporary
name beside the target and are renamed into place, so a reader (or a rerun after a crash)
never sees a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow.parquet as pq

__all__ = [
    "AtomicFile",
    "atomic_write",
    "exists",
    "file_identity",
    "file_version",
    "fs_path",
    "is_local",
    "list_files",
    "open_parquet",
    "parquet_metadata",
    "read_json",
    "remove",
    "stat_identity",
    "write_json",
]


def fs_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) of `url`, the path without a trailing slash."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


class AtomicFile:
    """A file streamed to a temporary name beside `url` (`.tmp-` plus a random suffix, which
    `list_files` never lists) and renamed into place by `commit`, or deleted by `abort`: a
    reader, or a rerun after a crash, never sees it half-written under its final name."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.path = fs_path(url)
        parent = self.path.rsplit("/", 1)[0]
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        self.tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        self.file: Any = self.fs.open(self.tmp, "wb")

    def commit(self) -> None:
        self.file.close()
        self.fs.mv(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        if self.fs.exists(self.tmp):
            self.fs.rm(self.tmp)


def atomic_write(url: str, data: bytes) -> None:
    """Write `data` to `url` through a temporary file renamed into place."""
    out = AtomicFile(url)
    try:
        out.file.write(data)
    except BaseException:
        out.abort()
        raise
    out.commit()


def write_json(url: str, doc: Any, *, sort_keys: bool = True) -> None:
    """Write `doc` as indented JSON, atomically."""
    atomic_write(url, (json.dumps(doc, indent=2, sort_keys=sort_keys) + "\n").encode())


def read_json(url: str) -> Any:
    """The JSON document at `url`, or None when it is missing or not valid JSON."""
    fs, path = fs_path(url)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def exists(url: str) -> bool:
    """True when something is at `url`."""
    fs, path = fs_path(url)
    return bool(fs.exists(path))


def remove(url: str) -> None:
    """Delete the file or folder at `url` (nothing to do when it is missing)."""
    fs, path = fs_path(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(url: str, *, prefix: str = "", suffix: str = "") -> list[str]:
    """Sorted URLs of the files directly in folder `url` named `prefix*suffix` (local paths
    come back plain); an empty list when the folder does not exist."""
    fs, path = fs_path(url)
    if not fs.exists(path):
        return []
    names = []
    for p in fs.ls(path, detail=False):
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith(prefix) and base.endswith(suffix) and ".tmp-" not in base:
            names.append(p)
    names.sort()
    if is_local(fs):
        return names
    return [str(fs.unstrip_protocol(p)) for p in names]


@contextlib.contextmanager
def open_parquet(url: str) -> Iterator[pq.ParquetFile]:
    """Parquet file `url` to read from: memory-mapped when it is local (Arrow reads the
    pages in place instead of through a Python file object, several times faster for
    image columns), through fsspec otherwise."""
    fs, path = fs_path(url)
    if is_local(fs):
        with pq.ParquetFile(path, memory_map=True) as pf:
            yield pf
    else:
        with fs.open(path, "rb") as f, pq.ParquetFile(f) as pf:
            yield pf


@functools.lru_cache(maxsize=1024)
def _parquet_metadata(url: str, size: Any, mtime: Any) -> pq.FileMetaData:
    with open_parquet(url) as pf:
        return pf.metadata


#: What fsspec filesystems report that changes with a file's contents (object stores:
#: ETag, generation, md5 / crc32c, version id; others: the modification time).
_VERSION_KEYS = (
    "ETag",
    "etag",
    "generation",
    "md5Hash",
    "crc32c",
    "VersionId",
    "version_id",
    "mtime",
    "LastModified",
    "last_modified",
    "updated",
    "created",
)


def stat_identity(st: os.stat_result) -> list[Any]:
    """`file_identity` of a local file from its `os.stat` result."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def file_identity(url: str, info: dict[str, Any] | None = None) -> list[Any]:
    """What tells one version of file `url` from another without reading it: `[size, ...]`.

    A local file: `[size, mtime_ns, ctime_ns, inode]` (the file itself, links followed).
    mtime alone can lie -- `cp -p`, `rsync -t` and `touch -d` set it back after changing the
    contents -- but ctime is set by the kernel on every write and cannot be set back, and a
    copy renamed into place has a new inode. Other filesystems: the size plus the version
    fields fsspec reports (ETag, generation, md5, version id, modification time), as text;
    `info` (what `fs.info` / `fs.find(detail=True)` gave for it) saves asking again.
    """
    fs, path = fs_path(url)
    if is_local(fs):
        return stat_identity(os.stat(path))
    info = info if info is not None else fs.info(path)
    return [info.get("size"), *(f"{k}={info[k]}" for k in _VERSION_KEYS if k in info)]


def file_version(url: str) -> tuple[Any, str]:
    """(size, the rest of `file_identity`) of file `url`: what caches of a file's contents
    key on, so a file rewritten under the same name is read again."""
    identity = file_identity(url)
    return identity[0], json.dumps(identity[1:], default=str)


def parquet_metadata(url: str) -> pq.FileMetaData:
    """The footer of parquet file `url` (row groups, sizes, schema), read once per version
    of the file (see `file_version`)."""
    return _parquet_metadata(url, *file_version(url))
