"""What the read step's fingerprint covers: everything the step reads, without reading it all.

A rerun reuses a finished step only while its fingerprint matches (`kiln.data_curation.runner`),
so the read step's fingerprint must change whenever anything it read may have changed:

- each input file: its path and `kiln.storage.file_identity` (local files: size, mtime_ns,
  ctime_ns, inode -- ctime is what catches an edit whose mtime was set back by `cp -p`,
  `rsync -t` or `touch -d`; object stores: ETag / generation / version), plus the sha256 of
  its bytes when it is at most `SMALL_FILE_BYTES` (a caption table is then covered by content
  on any filesystem, whatever its metadata says);
- with `input.image_path_column`: every file under `input.image_dir` (relative path and
  identity, digested into one hash), since rows may name any of them and an image replaced
  under the same name must be read again.

Hashing the bytes of large inputs and of every image would cost a full read on each rerun,
so those rely on their metadata; `kiln curate --fresh` redoes every step for filesystems whose
metadata cannot be trusted (one that reports no ctime or version, say). Moving or copying the
pool changes ctimes and inodes, so the first run after that reads it again.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import fsspec

from kiln import storage
from kiln.contracts import canonical_json
from kiln.data_curation.config import InputConfig

__all__ = ["SMALL_FILE_BYTES", "input_identity", "read_fingerprint", "tree_identity"]

#: Input files up to this size are fingerprinted by the sha256 of their bytes too.
SMALL_FILE_BYTES = 4 << 20
_PROGRESS_EVERY_S = 10.0


def input_identity(url: str) -> list[Any]:
    """`[url, *file_identity]` of one input file, plus `sha256:...` of its bytes when small."""
    identity = storage.file_identity(url)
    out: list[Any] = [url, *identity]
    size = identity[0]
    if isinstance(size, int) and size <= SMALL_FILE_BYTES:
        with fsspec.open(url, "rb") as f:
            out.append("sha256:" + hashlib.sha256(f.read()).hexdigest())
    return out


def _local_tree(root: str, add: Callable[[str, list[Any]], None]) -> None:
    """Every file under local folder `root` (links followed, each folder once)."""
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        rel_folder = os.path.relpath(folder, root)
        for name in sorted(files):
            rel = name if rel_folder == "." else f"{rel_folder}/{name}"
            try:
                add(rel, storage.stat_identity(os.stat(os.path.join(folder, name))))
            except OSError:  # a dangling link: the row naming it reads as missing
                add(rel, ["unreadable"])


def tree_identity(url: str, progress: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """`{"files": n, "sha256": digest}` over (relative path, identity) of every file under
    folder `url`, in path order; `progress(files so far, seconds)` is called every ~10 s."""
    digest = hashlib.sha256()
    count = 0
    start = last = time.perf_counter()

    def add(rel: str, identity: list[Any]) -> None:
        nonlocal count, last
        digest.update(canonical_json([rel, *identity]).encode("utf-8", "surrogateescape"))
        digest.update(b"\n")
        count += 1
        now = time.perf_counter()
        if progress is not None and now - last >= _PROGRESS_EVERY_S:
            last = now
            progress(count, now - start)

    fs, root = storage.fs_path(url)
    if storage.is_local(fs):
        _local_tree(root, add)
    else:
        found = fs.find(root, detail=True, withdirs=False)
        for path in sorted(found):
            rel = path[len(root) :].lstrip("/")
            add(rel, storage.file_identity(str(fs.unstrip_protocol(path)), found[path]))
    return {"files": count, "sha256": digest.hexdigest()}


def read_fingerprint(
    cfg: InputConfig, files: list[str], progress: Callable[[int, float], None] | None = None
) -> dict[str, Any]:
    """What the read step's fingerprint covers besides its config (see the module doc).

    `cfg` is the effective input config (`readers.effective_input`); `files` its input files.
    """
    out: dict[str, Any] = {"files": [input_identity(f) for f in files]}
    if cfg.image_dir and cfg.image_path_column:
        out["image_dir"] = tree_identity(cfg.image_dir, progress)
    return out
