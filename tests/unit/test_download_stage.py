"""Download stage on a real HTTP server on 127.0.0.1 serving the real Flickr8k photos, and
misbehaving on purpose (tests/helpers_http.py): every failure has its reason, transient ones
are retried, refused addresses are never connected to, output bytes are reproducible."""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from kiln.data_curation.fetch import FetchPolicy, address_refusal
from kiln.data_curation.plan import build_plan
from kiln.data_curation.resize import resize_image
from kiln.data_curation.stage import get_stage
from kiln.data_curation.stages import DROP_COLUMN, count_reasons, mark_dropped
from kiln.data_curation.stages.download import (
    DownloadConfig,
    DownloadStage,
    download_table,
    process_body,
)
from tests.helpers_http import PhotoServer, serve_photos

# ------------------------------------------------------------------ connection recorder

_CONNECTS: list[Any] = []
_RECORDING = threading.Event()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect" and _RECORDING.is_set():
        _CONNECTS.append(args[1])


sys.addaudithook(_audit)  # (audit hooks cannot be removed: it records only while asked)


@pytest.fixture
def connects() -> Iterator[list[Any]]:
    """Every address this process's sockets try to connect to during the test."""
    _CONNECTS.clear()
    _RECORDING.set()
    try:
        yield _CONNECTS
    finally:
        _RECORDING.clear()


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def photos(shared_data: Path) -> Path:
    return shared_data / "flickr8k_1k" / "images"


@pytest.fixture(scope="module")
def names(photos: Path) -> list[str]:
    return sorted(p.name for p in photos.glob("*.jpg"))[:6]


@pytest.fixture(scope="module")
def running(photos: Path) -> Iterator[PhotoServer]:
    with serve_photos(photos) as server:
        yield server


@pytest.fixture
def server(running: PhotoServer) -> PhotoServer:
    running.reset()
    return running


def _table(urls: Sequence[str | None], images: Sequence[bytes | None] | None = None) -> pa.Table:
    columns: dict[str, Any] = {
        "uid": [f"{i:032x}" for i in range(len(urls))],
        "url": pa.array(urls, pa.string()),
    }
    if images is not None:
        columns["image"] = pa.array(images, pa.binary())
    return pa.table(columns)


def _cfg(**kw: Any) -> DownloadConfig:
    base: dict[str, Any] = dict(allow_loopback=True, timeout_s=10.0, backoff_s=0.01, retries=2)
    return DownloadConfig(**{**base, **kw})


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# ------------------------------------------------------------------ behaviour


def test_good_urls_give_checked_resized_jpegs(
    server: PhotoServer, photos: Path, names: list[str]
) -> None:
    urls = [f"{server.base}/img/{n}" for n in names[:3]]
    out = download_table(_table(urls), _cfg(resize_mode="center_crop", image_size=64))
    assert out.column(DROP_COLUMN).null_count == 3
    rows = out.to_pylist()
    for name, row in zip(names, rows, strict=False):
        original = _decode((photos / name).read_bytes())
        stored = _decode(row["image"])
        assert stored.format == "JPEG" and stored.size == (64, 64)
        assert (row["width"], row["height"]) == (64, 64)
        assert (row["original_width"], row["original_height"]) == original.size
        assert row["download_status"] == 200 and row["resize_mode"] == "center_crop"
        assert row["download_bytes"] == (photos / name).stat().st_size
        assert row["final_url"] == row["url"] and row["download_error"] is None


def test_resize_no_keeps_the_served_jpeg_bytes(
    server: PhotoServer, photos: Path, names: list[str]
) -> None:
    out = download_table(_table([f"{server.base}/img/{names[0]}"]), _cfg())
    assert out.column("image")[0].as_py() == (photos / names[0]).read_bytes()
    again = download_table(_table([f"{server.base}/img/{names[0]}"]), _cfg(reencode=True))
    assert again.column("image")[0].as_py() != (photos / names[0]).read_bytes()
    assert (
        _decode(again.column("image")[0].as_py()).size
        == _decode((photos / names[0]).read_bytes()).size
    )


def test_every_misbehaviour_has_its_reason(server: PhotoServer, names: list[str]) -> None:
    b, n = server.base, names[0]
    cases: dict[str, str | None] = {
        f"{b}/status/404/x": "http_404",
        f"{b}/status/403/x": "http_error",
        f"{b}/status/500/x": "http_error",
        f"{b}/flaky/2/{n}": None,  # 500, 500, then the photo
        f"{b}/ratelimit/1/{names[1]}": None,
        f"{b}/slow/6/{names[2]}": "timeout",  # 3 attempts of 2 s
        f"{b}/truncated/{n}": "truncated_body",
        f"{b}/cut/{n}": "not_an_image",
        f"{b}/huge/64": "too_large",
        f"{b}/declared/999999999": "too_large",
        f"{b}/gzipbomb": "too_large",  # the cap counts decompressed bytes
        f"{b}/wrongtype/{n}": "wrong_content_type",
        f"{b}/notimage": "not_an_image",
        f"{b}/loop/a": "redirect_loop",
        f"{b}/chain/2/{names[3]}": None,
        f"{b}/chain/4/{names[3]}": "too_many_redirects",
        f"{b}/reset": "connection_error",
        "not a url": "bad_url",
        "http://": "bad_url",
        "ftp://example.com/x.jpg": "refused_scheme",
        f"{b}/redirect?to=file:///etc/passwd": "refused_scheme",
        "": "missing_url",
    }
    urls: list[str | None] = [*cases, None]
    cfg = _cfg(timeout_s=2.0, max_bytes=1 << 20, max_redirects=3)
    out = download_table(_table(urls), cfg)
    got = dict(zip(urls, out.column(DROP_COLUMN).to_pylist(), strict=True))
    expected: dict[str | None, str | None] = dict(cases.items())
    expected[None] = "missing_url"
    assert got == expected
    assert out.num_rows == len(urls)  # nothing lost
    counted = server.requests
    # transient failures are retried (retries=2: three attempts), final ones are not
    assert counted.count("/status/500/x") == 3 and counted.count("/status/404/x") == 1
    assert counted.count("/status/403/x") == 1 and counted.count(f"/flaky/2/{n}") == 3
    assert counted.count(f"/ratelimit/1/{names[1]}") == 2
    assert counted.count(f"/wrongtype/{n}") == 1 and counted.count("/huge/64") == 1
    assert server.huge_bytes_sent < 32 << 20, "the oversized body was read to its end"
    errors = dict(zip(urls, out.column("download_error").to_pylist(), strict=True))
    assert errors[f"{b}/status/500/x"] == "HTTP 500 (3 attempts)"
    kept = out.filter(out.column(DROP_COLUMN).is_null())
    assert kept.column("final_url").to_pylist() == [
        f"{b}/flaky/2/{n}",
        f"{b}/ratelimit/1/{names[1]}",
        f"{b}/chain/0/{names[3]}",
    ]


def test_retry_after_is_waited_for(server: PhotoServer, names: list[str]) -> None:
    """A 503 with Retry-After: 1 for 0.5 s: waiting as told succeeds, hammering does not."""
    url = f"{server.base}/fail/busy/0.5/{names[0]}"
    out = download_table(_table([url]), _cfg(retries=1, max_backoff_s=5))
    assert out.column(DROP_COLUMN).to_pylist() == [None]
    assert server.requests == [f"/fail/busy/0.5/{names[0]}"] * 2
    server.reset()
    hasty = download_table(_table([url]), _cfg(retries=3, max_backoff_s=0.02))
    assert hasty.column(DROP_COLUMN).to_pylist() == ["http_error"]
    assert hasty.column("download_status").to_pylist() == [503]


def test_retries_zero_means_one_attempt(server: PhotoServer, names: list[str]) -> None:
    out = download_table(_table([f"{server.base}/flaky/1/{names[0]}"]), _cfg(retries=0))
    assert out.column(DROP_COLUMN).to_pylist() == ["http_error"]
    assert out.column("download_status").to_pylist() == [500]


def test_redirects_to_private_addresses_are_refused_without_connecting(
    server: PhotoServer, names: list[str], connects: list[Any]
) -> None:
    targets = [
        "http://10.0.0.1/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://192.168.1.1/a.jpg",
        "http://[::ffff:10.0.0.1]/x.jpg",
        "http://0.0.0.0/x.jpg",
        "http://224.0.0.1/x.jpg",
    ]
    urls = [f"{server.base}/redirect?to={t}" for t in targets]
    out = download_table(_table([*urls, f"{server.base}/img/{names[0]}"]), _cfg())
    assert out.column(DROP_COLUMN).to_pylist() == ["refused_address"] * len(targets) + [None]
    assert connects, "the recorder saw no connection at all"
    hosts = {a[0] for a in connects if isinstance(a, tuple)}
    assert hosts == {"127.0.0.1"}, f"connection attempts outside loopback: {hosts}"
    # allow_private lets private ranges through, never link-local (cloud metadata)
    policy = FetchPolicy(allow_private=True)
    assert address_refusal("10.0.0.1", policy) is None
    assert address_refusal("169.254.169.254", policy) == "link-local address"
    assert address_refusal("127.0.0.1", policy) == "loopback address"


def test_loopback_is_refused_by_default_before_connecting(
    server: PhotoServer, names: list[str], connects: list[Any]
) -> None:
    urls = [
        f"{server.base}/img/{names[0]}",
        f"http://localhost:{server.port}/img/{names[0]}",  # a name: checked after lookup
        f"http://[::1]:{server.port}/img/{names[0]}",
        f"http://2130706433:{server.port}/img/{names[0]}",  # 127.0.0.1 as one number
        f"http://127.1:{server.port}/img/{names[0]}",
    ]
    out = download_table(_table(urls), DownloadConfig())
    reasons = out.column(DROP_COLUMN).to_pylist()
    assert reasons[:3] == ["refused_address"] * 3
    assert set(reasons[3:]) <= {"refused_address", "bad_url"}
    assert connects == [] and server.requests == []
    allowed = download_table(_table(urls[1:2]), DownloadConfig(allow_loopback=True))
    assert allowed.column(DROP_COLUMN).to_pylist() == [None]


def test_address_policy_table() -> None:
    strict, mirror = FetchPolicy(), FetchPolicy(allow_loopback=True)
    public = ["93.184.216.34", "2606:4700:4700::1111", "8.8.8.8"]
    assert [address_refusal(a, strict) for a in public] == [None] * 3
    refused = {
        "127.0.0.1": "loopback address",
        "::1": "loopback address",
        "10.1.2.3": "private address",
        "172.16.0.1": "private address",
        "192.168.0.1": "private address",
        "100.64.0.1": "private address",
        "fc00::1": "private address",
        "169.254.169.254": "link-local address",
        "fe80::1": "link-local address",
        "224.0.0.251": "multicast address",
        "ff02::1": "multicast address",
        "240.0.0.1": "reserved address",
        "0.0.0.0": "unspecified address",
        "::": "unspecified address",
        "::ffff:127.0.0.1": "loopback address",
    }
    assert {a: address_refusal(a, strict) for a in refused} == refused
    assert address_refusal("127.0.0.1", mirror) is None
    assert address_refusal("10.1.2.3", mirror) == "private address"


def test_rows_with_images_or_dropped_are_not_fetched(
    server: PhotoServer, photos: Path, names: list[str]
) -> None:
    own = (photos / names[1]).read_bytes()
    urls = [f"{server.base}/img/{names[0]}", f"{server.base}/img/{names[1]}"] * 2
    table = _table(urls, [None, own, None, None])
    table = mark_dropped(table, np.array([False, False, True, False]), "empty_text")
    out = download_table(table, _cfg())
    assert sorted(server.requests) == [f"/img/{names[0]}", f"/img/{names[1]}"]
    assert out.column(DROP_COLUMN).to_pylist() == [None, None, "empty_text", None]
    assert out.column("image")[1].as_py() == own
    assert out.column("download_status").to_pylist() == [200, None, None, 200]
    # a URL shared by several rows is fetched once
    server.reset()
    again = download_table(_table([urls[0]] * 5), _cfg())
    assert server.requests == [f"/img/{names[0]}"]
    assert len(set(again.column("image").to_pylist())) == 1
    # and so is one that the worker's previous batch had (the stage's context)
    stage = DownloadStage()
    recent = stage.setup(_cfg(), None)
    server.reset()
    for _ in range(2):
        stage.apply(_table([urls[0], urls[1]]), _cfg(), recent)
    assert sorted(server.requests) == [f"/img/{names[0]}", f"/img/{names[1]}"]


def test_bytes_do_not_depend_on_batches_or_concurrency(
    server: PhotoServer, names: list[str]
) -> None:
    urls = [f"{server.base}/img/{n}" for n in names] + [f"{server.base}/flaky/1/{names[0]}"]
    cfg = _cfg(resize_mode="border", image_size=96, jpeg_quality=80)
    whole = download_table(_table(urls), cfg)
    server.reset()
    cfg1 = _cfg(resize_mode="border", image_size=96, jpeg_quality=80, concurrency=1)
    parts = [download_table(_table(urls[i : i + 2]), cfg1) for i in range(0, len(urls), 2)]
    assert pa.concat_tables(parts).column("image").to_pylist() == whole.column("image").to_pylist()
    assert whole.column(DROP_COLUMN).null_count == len(urls)


def test_base_url_joins_relative_paths(server: PhotoServer, names: list[str]) -> None:
    cfg = _cfg(base_url=f"{server.base}/img")
    out = download_table(_table([names[0], f"/{names[1]}", "missing.jpg"]), cfg)
    assert out.column(DROP_COLUMN).to_pylist() == [None, None, "http_404"]
    assert out.column("final_url")[0].as_py() == f"{server.base}/img/{names[0]}"


def test_fsspec_schemes_only_when_listed(photos: Path, names: list[str]) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/kiln-download-test/a.jpg", (photos / names[0]).read_bytes())
    try:
        urls = ["memory://kiln-download-test/a.jpg", "memory://kiln-download-test/none.jpg"]
        out = download_table(_table(urls), _cfg(fs_schemes=["memory"]))
        assert out.column(DROP_COLUMN).to_pylist() == [None, "http_404"]
        assert out.column("image")[0].as_py() == (photos / names[0]).read_bytes()
        big = download_table(_table(urls[:1]), _cfg(fs_schemes=["memory"], max_bytes=100))
        assert big.column(DROP_COLUMN).to_pylist() == ["too_large"]
        refused = download_table(_table(urls[:1]), _cfg())
        assert refused.column(DROP_COLUMN).to_pylist() == ["refused_scheme"]
    finally:
        fs.rm("/kiln-download-test", recursive=True)


def test_content_type_check_can_be_turned_off(server: PhotoServer, names: list[str]) -> None:
    url = f"{server.base}/wrongtype/{names[0]}"
    out = download_table(_table([url]), _cfg(content_types=None))
    assert out.column(DROP_COLUMN).to_pylist() == [None]


# ------------------------------------------------------------------ resize modes


def _photo(photos: Path, names: list[str]) -> Image.Image:
    image = _decode((photos / names[0]).read_bytes()).convert("RGB")
    assert image.size[0] != image.size[1]
    return image


def test_resize_modes_follow_img2dataset(photos: Path, names: list[str]) -> None:
    image = _photo(photos, names)
    w, h = image.size
    short, long = min(w, h), max(w, h)
    size = 64
    assert resize_image(image, "no", size) is image
    ratio = resize_image(image, "keep_ratio", size)
    assert min(ratio.size) == size and ratio.size[0] == round(w * size / short)
    largest = resize_image(image, "keep_ratio_largest", size)
    assert max(largest.size) == size and largest.size[1] == round(h * size / long)
    crop = resize_image(image, "center_crop", size)
    assert crop.size == (size, size)
    left, top = (ratio.size[0] - size) // 2, (ratio.size[1] - size) // 2
    assert left + top > 0
    window = np.asarray(ratio)[top : top + size, left : left + size]
    assert np.array_equal(np.asarray(crop), window)
    border = resize_image(image, "border", size)
    assert border.size == (size, size)
    (lw, lh), arr = largest.size, np.asarray(border)
    x, y = (size - lw) // 2, (size - lh) // 2
    assert x + y > 0
    assert np.array_equal(arr[y : y + lh, x : x + lw], np.asarray(largest))
    inside = np.zeros(arr.shape[:2], dtype=bool)
    inside[y : y + lh, x : x + lw] = True
    assert (arr[~inside] == 255).all()  # white padding, the odd pixel at the bottom / right
    # growing: only when asked
    big = long + 10
    assert resize_image(image, "center_crop", big, only_if_bigger=True) is image
    assert resize_image(image, "border", big).size == (big, big)


def test_process_body_never_raises() -> None:
    cfg = DownloadConfig()
    for body in (b"", b"GIF89a", b"\xff\xd8\xff" + b"\0" * 100):
        assert process_body(body, cfg).reason == "not_an_image"
    bomb = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(bomb, format="PNG")  # 100 MP > MAX_IMAGE_PIXELS
    assert process_body(bomb.getvalue(), cfg).reason == "not_an_image"


# ------------------------------------------------------------------ config and plan


def test_config_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="http and https are always fetched"):
        DownloadConfig(fs_schemes=["https"])
    with pytest.raises(ValueError, match="no fsspec protocol"):
        DownloadConfig(fs_schemes=["nosuch"])
    with pytest.raises(ValueError, match="base_url"):
        DownloadConfig(base_url="mirror/images")
    with pytest.raises(ValueError, match="resize_mode"):
        build_plan([{"stage": "download", "resize_mode": "crop"}])
    plan = build_plan([{"stage": "download", "allow_loopback": True}, {"stage": "image"}])
    assert plan[0].stage is get_stage("download")
    with pytest.raises(ValueError, match="allow_loopback: true"):
        DownloadStage().check(DownloadConfig(base_url="http://127.0.0.1:8765/"))
    with pytest.raises(ValueError, match="allow_private: true"):
        DownloadStage().check(DownloadConfig(base_url="http://10.0.0.7/", allow_loopback=True))
    assert (
        DownloadStage().check(DownloadConfig(base_url="http://127.0.0.1/", allow_loopback=True))
        == {}
    )


def test_drop_reasons_are_registered() -> None:
    reasons = get_stage("download").drop_reasons
    for r in ("http_404", "http_error", "timeout", "too_large", "not_an_image"):
        assert r in reasons
    for r in ("refused_address", "bad_url", "redirect_loop", "too_many_redirects"):
        assert r in reasons
    table = download_table(_table([None]), DownloadConfig())
    assert count_reasons(table) == {"missing_url": 1}
