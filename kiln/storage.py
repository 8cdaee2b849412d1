"""The one fsspec layer for files kiln writes and reads back: atomic writes, JSON, listing.

Every helper takes a URL (a local path, `memory://`, `s3://`, ...). Writes go to a temporary
name beside the target and are renamed into place, so a reader (or a rerun after a crash)
never sees a half-written file under its final name.
"""

from __future__ import annotations

import functools
import json
import uuid
from typing import Any

import fsspec
import pyarrow.parquet as pq

__all__ = [
    "atomic_write",
    "exists",
    "fs_path",
    "list_files",
    "parquet_metadata",
    "read_json",
    "remove",
    "write_json",
]


def fs_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) of `url`, the path without a trailing slash."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def atomic_write(url: str, data: bytes) -> None:
    """Write `data` to `url` through a temporary file renamed into place."""
    fs, path = fs_path(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


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
    if _is_local(fs):
        return names
    return [str(fs.unstrip_protocol(p)) for p in names]


@functools.lru_cache(maxsize=1024)
def _parquet_metadata(url: str, size: Any, mtime: Any) -> pq.FileMetaData:
    with fsspec.open(url, "rb") as f:
        return pq.ParquetFile(f).metadata


def parquet_metadata(url: str) -> pq.FileMetaData:
    """The footer of parquet file `url` (row groups, sizes, schema), read once per version
    of the file: cached by (url, size, mtime), so a file rewritten under the same name (a
    redone task) is read again."""
    fs, path = fs_path(url)
    info = fs.info(path)
    mtime = info.get("mtime", info.get("LastModified", info.get("updated")))
    return _parquet_metadata(url, info.get("size"), str(mtime))
