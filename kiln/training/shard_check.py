"""Check a dataset's shards against its manifest before training reads them.

`kiln curate` records every shard's size and sha256 in ``manifest.json``. A shard changed
after that (a zeroed disk block, a truncated copy, a shard from another run dropped in)
would otherwise surface at its first batch as a raw tar or JPEG error from inside a rank,
or not at all. `verify_shards` hashes every shard once, in the launching process before
any rank starts (``data.verify_shards``, on by default), and raises `ShardChecksumError`
naming the shard, both hashes and the fix.

Cost: one sequential read of the dataset per launch, hashed on a few threads (hashlib
releases the GIL); the quickstart's 6 MB dataset takes milliseconds, and a launch that takes
longer than a second says how long it took. For datasets much larger than the page cache,
turn it off (``data.verify_shards: false``) and rely on the loader's own checks.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import fsspec

from kiln.contracts import DatasetManifest, ShardInfo

__all__ = ["ShardChecksumError", "verify_shards"]

_CHUNK = 1 << 20
_THREADS = 4
_SAY_AFTER_S = 1.0


class ShardChecksumError(ValueError):
    """A shard's bytes differ from what its manifest recorded; the message names the shard,
    both hashes and the fix."""


def _digest(url: str) -> tuple[int, str]:
    """(bytes read, sha256 hex) of the file at `url`."""
    h = hashlib.sha256()
    size = 0
    with fsspec.open(url, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _problem(url: str, shard: ShardInfo) -> str | None:
    try:
        size, sha = _digest(url)
    except FileNotFoundError:
        return f"shard {url!r} is missing (manifest.json lists it)"
    if sha == shard.sha256:
        return None
    sizes = f" ({size} bytes, {shard.bytes} when written)" if size != shard.bytes else ""
    return (
        f"shard {url!r} does not match manifest.json{sizes}: sha256 is {sha}, "
        f"expected {shard.sha256}"
    )


def verify_shards(
    dataset: str, manifest: DatasetManifest, log: Callable[[str], None] | None = None
) -> float:
    """Hash every shard of `manifest` (the manifest of `dataset`) and compare with the
    recorded sha256; returns the seconds it took. Raises `ShardChecksumError` for the
    first damaged or missing shard (in manifest order), saying how many others are too."""
    started = time.perf_counter()
    urls = [manifest.shard_url(dataset, s) for s in manifest.shards]
    with ThreadPoolExecutor(max_workers=min(_THREADS, max(1, len(urls)))) as pool:
        problems = [p for p in pool.map(_problem, urls, manifest.shards) if p]
    if problems:
        more = f" ({len(problems) - 1} more shard(s) too)" if len(problems) > 1 else ""
        raise ShardChecksumError(
            f"{problems[0]}{more}: the dataset changed or was damaged after `kiln curate` "
            "wrote it; re-run the curation (`kiln curate RECIPE --fresh`) or restore the "
            f"shard from a good copy, then train again (dataset {dataset!r})"
        )
    took = time.perf_counter() - started
    if log is not None and took > _SAY_AFTER_S:
        total = sum(s.bytes for s in manifest.shards)
        log(
            f"verified {len(urls)} shard(s), {total / 1e6:.0f} MB, against manifest.json in "
            f"{took:.1f}s (data.verify_shards: false skips this)"
        )
    return took
