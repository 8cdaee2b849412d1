"""Download stage: fetch each row's image from its `url`, check it, resize and re-encode it.

For every alive row without image bytes, the URL (joined to `base_url` when it is a relative
path) is fetched by `kiln.data_curation.fetch` -- address policy, redirects re-checked,
retries with backoff on transient errors only, size cap, content-type check -- at most
`concurrency` requests in flight per task; a URL that several rows share is fetched once.
The body must decode with Pillow (decompression-bomb guard on, `image.decode_rgb`), is
resized by `resize_mode` (img2dataset's modes, `kiln.data_curation.resize`) and stored as
RGB JPEG at `jpeg_quality`; with `resize_mode: no`, an RGB JPEG keeps the bytes the server
sent unless `reencode` is on. Each failure drops the row with its reason (`http_404`,
`timeout`, `refused_address`, ... : `FAILURES`, plus `not_an_image`) and a short
`download_error`; no row is lost.

Rerunning: rows that already carry image bytes (a pool that mixes URLs and images, or a
plan that downloads twice) are passed through untouched and not fetched, and the runner's
per-task completion markers make a killed download step refetch only its unfinished tasks.
The stored bytes are a pure function of the response body and the config, so they do not
depend on how many workers or tasks ran.

Columns: `image`, `width`/`height` (of the stored image), `original_width`/`original_height`
(as decoded), `download_status` (last HTTP status, null without one), `download_bytes` (body
size as received), `final_url` (after redirects), `resize_mode`, `download_error`; all but
`image`, `width` and `height` stay null on rows that were not downloaded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator
from yarl import URL

from kiln.contracts import StrictModel
from kiln.data_curation.fetch import FAILURES, FetchPolicy, FetchResult, fetch_all, url_refusal
from kiln.data_curation.resize import ResizeMode, resize_image
from kiln.data_curation.stage import MapStage, register
from kiln.data_curation.stages import (
    alive_mask,
    ensure_drop_column,
    mark_dropped,
    replace_column,
)
from kiln.data_curation.stages.image import decode_rgb, encode_jpeg

__all__ = [
    "DOWNLOAD_REASONS",
    "DownloadConfig",
    "DownloadStage",
    "Processed",
    "RecentResults",
    "download_table",
    "process_body",
]

#: Every drop reason of the stage: the fetch failures plus the decode check.
DOWNLOAD_REASONS: dict[str, str] = {
    **FAILURES,
    "not_an_image": "the body does not decode as an image (truncated, not an image, or over "
    "PIL's MAX_IMAGE_PIXELS: the decompression-bomb guard)",
}

_DEFAULT_TYPES = ["image/*", "application/octet-stream", "binary/octet-stream"]
T = TypeVar("T")


class DownloadConfig(StrictModel):
    """Fetching each row's image from its URL: concurrency, retries, limits, address policy,
    resize and re-encode."""

    concurrency: int = Field(
        default=64, ge=1, le=4096, description="requests in flight at once, per task"
    )
    timeout_s: float = Field(
        default=10.0, gt=0, description="seconds one request (one redirect hop) may take"
    )
    retries: int = Field(
        default=2,
        ge=0,
        le=20,
        description="extra attempts after a transient failure (429, 5xx, timeout, "
        "connection reset, body cut short); 404 and other errors are final",
    )
    backoff_s: float = Field(
        default=0.5,
        ge=0,
        description="wait before the first retry; doubles each retry (jittered from the URL)",
    )
    max_backoff_s: float = Field(
        default=10.0, ge=0, description="longest wait between attempts (caps Retry-After too)"
    )
    max_bytes: int = Field(
        default=32 << 20,
        ge=1,
        description="largest body accepted; a bigger one is abandoned mid-stream (too_large)",
    )
    max_redirects: int = Field(
        default=5, ge=0, le=50, description="redirects followed per URL (each hop re-checked)"
    )
    allow_loopback: bool = Field(
        default=False,
        description="allow hosts on loopback addresses (127.0.0.0/8, ::1): tests and your own "
        "local mirror; private ranges stay refused (allow_private)",
    )
    allow_private: bool = Field(
        default=False,
        description="allow private and other non-global addresses (10/8, 172.16/12, "
        "192.168/16, 100.64/10, fc00::/7): only for a mirror on your own network; "
        "link-local (169.254/16, cloud metadata), multicast and reserved stay refused",
    )
    fs_schemes: list[str] = Field(
        default_factory=list,
        description="non-http schemes read through fsspec, e.g. [s3, gs] (needs s3fs / "
        "gcsfs; credentials from the environment); empty: http and https only",
    )
    content_types: list[str] | None = Field(
        default_factory=lambda: list(_DEFAULT_TYPES),
        description="Content-Types accepted ('image/*' matches any image type); a response "
        "of another type is dropped as wrong_content_type unread; null: no check",
    )
    user_agent: str = Field(
        default="kiln-download/0.1", min_length=1, description="User-Agent header sent"
    )
    base_url: str | None = Field(
        default=None,
        description="URL that relative URLs in the url column are joined to (a list of "
        "file names served by a mirror); absolute URLs are used as they are",
    )
    resize_mode: ResizeMode = Field(
        default="no",
        description="img2dataset's modes: no (keep the size), keep_ratio (shorter side = "
        "image_size), keep_ratio_largest (longer side = image_size), center_crop (shorter "
        "side = image_size, then the central square), border (longer side = image_size, "
        "padded with white to a square)",
    )
    image_size: int = Field(
        default=256, ge=8, le=16384, description="target size of resize_mode, pixels"
    )
    resize_only_if_bigger: bool = Field(
        default=False, description="never enlarge: leave images smaller than image_size alone"
    )
    jpeg_quality: int = Field(
        default=95, ge=1, le=100, description="JPEG quality of re-encoded images"
    )
    reencode: bool = Field(
        default=False,
        description="with resize_mode: no, re-encode even images that already are RGB JPEGs "
        "(by default their downloaded bytes are kept: no second generation loss)",
    )
    decode_threads: int = Field(
        default=2,
        ge=1,
        le=64,
        description="threads per task that decode, resize and encode while downloads go on",
    )

    @field_validator("fs_schemes")
    @classmethod
    def _check_schemes(cls, value: list[str]) -> list[str]:
        out = [s.strip().lower().removesuffix("://") for s in value]
        for scheme in out:
            if scheme in ("http", "https"):
                raise ValueError(
                    f"fs_schemes lists {scheme!r}: http and https are always fetched (by "
                    "aiohttp, with the address policy); list only other schemes, e.g. [s3, gs]"
                )
            if scheme not in fsspec.available_protocols():
                raise ValueError(
                    f"fs_schemes lists {scheme!r}, which is no fsspec protocol: use e.g. s3, gs, az"
                )
        return out

    @model_validator(mode="after")
    def _check_base_url(self) -> DownloadConfig:
        if self.base_url is not None:
            scheme = URL(self.base_url).scheme.lower()
            if scheme not in ("http", "https", *self.fs_schemes) or not URL(self.base_url).host:
                raise ValueError(
                    f"base_url={self.base_url!r} is not an http(s) URL with a host: set it to "
                    "e.g. http://mirror.example/images/ (or list its scheme in fs_schemes)"
                )
        return self

    def policy(self) -> FetchPolicy:
        """The fetch policy these settings describe."""
        return FetchPolicy(
            timeout_s=self.timeout_s,
            retries=self.retries,
            backoff_s=self.backoff_s,
            max_backoff_s=self.max_backoff_s,
            max_bytes=self.max_bytes,
            max_redirects=self.max_redirects,
            allow_loopback=self.allow_loopback,
            allow_private=self.allow_private,
            fs_schemes=tuple(self.fs_schemes),
            content_types=tuple(self.content_types) if self.content_types is not None else None,
            user_agent=self.user_agent,
            concurrency=self.concurrency,
        )


@dataclass(frozen=True)
class Processed:
    """A downloaded body after the decode check and resize: the bytes to store, or why not."""

    image: bytes | None
    reason: str | None = None
    original_size: tuple[int, int] | None = None
    size: tuple[int, int] | None = None


def process_body(body: bytes, cfg: DownloadConfig) -> Processed:
    """Decode `body`, resize it by `cfg.resize_mode`, encode it (module doc); never raises."""
    try:
        decoded = decode_rgb(body)
    except Exception:
        return Processed(None, "not_an_image")
    image = decoded.image
    out = resize_image(
        image, cfg.resize_mode, cfg.image_size, only_if_bigger=cfg.resize_only_if_bigger
    )
    if out is image and decoded.plain_jpeg and not cfg.reencode:
        data = body
    else:
        try:
            data = encode_jpeg(out, cfg.jpeg_quality)
        except Exception:
            return Processed(None, "not_an_image")
    return Processed(data, None, image.size, out.size)


def _run(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, also where a loop already runs here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def _absolute(url: str, base: str | None) -> str:
    if base is None or "://" in url:
        return url
    return str(URL(base.rstrip("/") + "/").join(URL(url.lstrip("/"))))


async def _fetch_and_process(
    urls: list[str], cfg: DownloadConfig
) -> list[tuple[FetchResult, Processed | None]]:
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(cfg.decode_threads) as pool:

        async def on_result(result: FetchResult) -> Processed | None:
            if result.body is None:
                return None
            return await loop.run_in_executor(pool, process_body, result.body, cfg)

        return await fetch_all(urls, cfg.policy(), on_result)


def _strings(table: pa.Table, name: str) -> list[Any]:
    if name not in table.column_names:
        return [None] * table.num_rows
    return table.column(name).to_pylist()


def _ints(table: pa.Table, name: str) -> list[int | None]:
    return [v if isinstance(v, int) else None for v in _strings(table, name)]


class RecentResults:
    """The latest URLs' results of one worker, so rows sharing a URL across two batches (a
    caption table lists each photo once per caption, in a row) fetch it once. Bounded by
    entries and by image bytes; a pure cache: results are a function of the response."""

    def __init__(self, max_entries: int = 4096, max_bytes: int = 64 << 20) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[str, tuple[FetchResult, Processed | None]] = OrderedDict()
        self._bytes = 0

    @staticmethod
    def _size(item: tuple[FetchResult, Processed | None]) -> int:
        processed = item[1]
        return len(processed.image) if processed is not None and processed.image else 0

    def get(self, url: str) -> tuple[FetchResult, Processed | None] | None:
        return self._items.get(url)

    def put(self, url: str, item: tuple[FetchResult, Processed | None]) -> None:
        if url in self._items:
            return
        self._items[url] = item
        self._bytes += self._size(item)
        while self._items and (len(self._items) > self.max_entries or self._bytes > self.max_bytes):
            _, old = self._items.popitem(last=False)
            self._bytes -= self._size(old)


def download_table(
    table: pa.Table, cfg: DownloadConfig, recent: RecentResults | None = None
) -> pa.Table:
    """Download the images of the alive rows of `table` that have none (module doc);
    `recent` (the worker's cache) saves refetching URLs the previous batches had."""
    table = ensure_drop_column(table)
    n = table.num_rows
    alive = alive_mask(table)
    urls = _strings(table, "url")
    images: list[bytes | None] = _strings(table, "image")
    widths, heights = _ints(table, "width"), _ints(table, "height")
    status: list[int | None] = [None] * n
    nbytes: list[int | None] = [None] * n
    final: list[str | None] = [None] * n
    orig_w: list[int | None] = [None] * n
    orig_h: list[int | None] = [None] * n
    modes: list[str | None] = [None] * n
    errors: list[str | None] = [None] * n
    reasons: list[str | None] = [None] * n
    wanted: dict[str, list[int]] = {}
    for i in range(n):
        if not alive[i] or images[i]:
            continue
        url = urls[i].strip() if isinstance(urls[i], str) else ""
        if not url:
            reasons[i], errors[i] = "missing_url", "no url"
            continue
        wanted.setdefault(_absolute(url, cfg.base_url), []).append(i)
    known = {u: recent.get(u) for u in wanted} if recent is not None else {}
    todo = [u for u in wanted if known.get(u) is None]
    got = dict(zip(todo, _run(lambda: _fetch_and_process(todo, cfg)), strict=True)) if todo else {}
    if recent is not None:
        for u, one in got.items():
            recent.put(u, one)
    for url, rows in wanted.items():
        item = got.get(url) or known.get(url)
        assert item is not None
        fetched, processed = item
        reason = fetched.reason or (processed.reason if processed else None)
        for i in rows:
            status[i], final[i] = fetched.status, fetched.final_url
            if reason is not None:
                reasons[i] = reason
                errors[i] = fetched.detail if fetched.reason else "does not decode as an image"
                continue
            assert processed is not None and processed.size and processed.original_size
            images[i] = processed.image
            nbytes[i] = fetched.size
            orig_w[i], orig_h[i] = processed.original_size
            widths[i], heights[i] = processed.size
            modes[i] = cfg.resize_mode
    out = replace_column(table, "image", pa.array(images, pa.binary()))
    for name, values, kind in (
        ("width", widths, pa.int32()),
        ("height", heights, pa.int32()),
        ("original_width", orig_w, pa.int32()),
        ("original_height", orig_h, pa.int32()),
        ("download_status", status, pa.int32()),
        ("download_bytes", nbytes, pa.int64()),
        ("final_url", final, pa.string()),
        ("resize_mode", modes, pa.string()),
        ("download_error", errors, pa.string()),
    ):
        out = replace_column(out, name, pa.array(values, kind))
    for reason in DOWNLOAD_REASONS:
        mask = np.fromiter((r == reason for r in reasons), dtype=bool, count=n)
        if mask.any():
            out = mark_dropped(out, mask, reason)
    return out


class DownloadStage(MapStage[DownloadConfig]):
    """Fetch each row's image from its URL (safely, with retries), check, resize, re-encode."""

    name = "download"
    config = DownloadConfig
    summary = "fetch images from URLs (http(s), s3/gs), decode check, resize, re-encode"
    adds = (
        "image",
        "width",
        "height",
        "original_width",
        "original_height",
        "download_status",
        "download_bytes",
        "final_url",
        "resize_mode",
        "download_error",
    )
    images = True
    batch_rows = 512
    drop_reasons: ClassVar[dict[str, str]] = DOWNLOAD_REASONS

    def check(self, cfg: DownloadConfig) -> dict[str, Any]:
        if cfg.base_url is not None:
            refused = url_refusal(URL(cfg.base_url), cfg.policy())
            if refused is not None:
                raise ValueError(
                    f"download.base_url={cfg.base_url!r} would be refused ({refused[1]}): "
                    "for a mirror on this machine set download.allow_loopback: true, on your "
                    "own network download.allow_private: true"
                )
        for scheme in cfg.fs_schemes:
            try:
                fsspec.get_filesystem_class(scheme)
            except ImportError as e:
                raise ValueError(
                    f"download.fs_schemes lists {scheme!r} but its fsspec filesystem cannot "
                    f"be loaded ({e}): install its package (s3: s3fs, gs: gcsfs)"
                ) from None
        return {}

    def setup(self, cfg: DownloadConfig, state: pa.Table | None) -> RecentResults:
        return RecentResults()

    def apply(self, table: pa.Table, cfg: DownloadConfig, ctx: Any) -> pa.Table:
        return download_table(table, cfg, ctx)


register(DownloadStage())
