"""Image stage on real encoded bytes: decode checks, filters, RGB JPEG output, content hash."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from kiln.data_curation.config import ImageConfig
from kiln.data_curation.stages import DROP_COLUMN, count_reasons, mark_dropped
from kiln.data_curation.stages.image import apply_image_checks, pixel_sha256


def _pixels(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _table(images: Sequence[bytes | None]) -> pa.Table:
    return pa.table(
        {
            "uid": [f"{i:032x}" for i in range(len(images))],
            "image": pa.array(list(images), type=pa.binary()),
        }
    )


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_reasons_and_columns() -> None:
    jpeg = _encode(_pixels(40, 30), "JPEG", quality=90)
    images = [
        jpeg,
        None,
        b"",
        jpeg[: len(jpeg) // 2],  # truncated
        b"<html>404</html>",
        _encode(_pixels(10, 40), "PNG"),  # too small
        _encode(_pixels(100, 20), "PNG"),  # aspect 5
    ]
    out = apply_image_checks(_table(images), ImageConfig(min_size=16, max_aspect_ratio=3.0))
    assert out.column(DROP_COLUMN).to_pylist() == [
        None,
        "missing_image",
        "missing_image",
        "bad_image",
        "bad_image",
        "image_too_small",
        "bad_aspect_ratio",
    ]
    assert out.schema.field("width").type == pa.int32()
    assert out.schema.field("height").type == pa.int32()
    assert out.schema.field("image_sha256").type == pa.string()
    assert out.column("width").to_pylist()[0] == 40
    assert out.column("height").to_pylist()[0] == 30
    # rejected rows keep their original bytes for the rejects table
    assert out.column("image")[3].as_py() == images[3]
    assert out.column("image_sha256").to_pylist()[1:] == [None] * 6


def test_plain_rgb_jpeg_keeps_its_bytes() -> None:
    jpeg = _encode(_pixels(32, 32), "JPEG", quality=75)
    out = apply_image_checks(_table([jpeg]), ImageConfig(jpeg_quality=95))
    assert out.column("image")[0].as_py() == jpeg


def test_png_and_alpha_are_reencoded_as_rgb_jpeg() -> None:
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    images = [
        _encode(_pixels(32, 32), "PNG"),
        _encode(rgba, "PNG"),
        _encode(_pixels(32, 32).convert("L"), "JPEG"),
    ]
    out = apply_image_checks(_table(images), ImageConfig())
    for data in out.column("image").to_pylist():
        image = _decode(data)
        assert image.format == "JPEG" and image.mode == "RGB"
    # transparency is composited on white
    assert _decode(out.column("image")[1].as_py()).getpixel((16, 16)) == (255, 255, 255)


def test_resize_longer_side_to_max_size() -> None:
    images = [_encode(_pixels(200, 100), "JPEG"), _encode(_pixels(60, 90), "PNG")]
    out = apply_image_checks(_table(images), ImageConfig(max_size=64))
    assert out.column("width").to_pylist() == [64, 43]
    assert out.column("height").to_pylist() == [32, 64]
    assert _decode(out.column("image")[0].as_py()).size == (64, 32)


def test_reencoding_is_deterministic() -> None:
    images = [_encode(_pixels(70, 50, seed=s), "PNG") for s in range(3)]
    cfg = ImageConfig(max_size=32, jpeg_quality=80)
    a = apply_image_checks(_table(images), cfg)
    b = apply_image_checks(_table(images), cfg)
    assert a.equals(b)


def test_sha256_is_content_not_encoding() -> None:
    pixels = _pixels(32, 24, seed=5)
    png_fast = _encode(pixels, "PNG", compress_level=1)
    png_small = _encode(pixels, "PNG", compress_level=9)
    assert png_fast != png_small
    other = _encode(_pixels(32, 24, seed=6), "PNG")
    transposed = _encode(pixels.transpose(Image.Transpose.TRANSPOSE), "PNG")  # 24x32
    out = apply_image_checks(_table([png_fast, png_small, other, transposed]), ImageConfig())
    hashes = out.column("image_sha256").to_pylist()
    assert hashes[0] == hashes[1] == pixel_sha256(pixels)
    assert len({hashes[0], hashes[2], hashes[3]}) == 3


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    jpeg = _encode(_pixels(40, 20), "JPEG", exif=exif.tobytes())
    out = apply_image_checks(_table([jpeg]), ImageConfig(max_aspect_ratio=3.0))
    assert (out.column("width")[0].as_py(), out.column("height")[0].as_py()) == (20, 40)
    assert out.column("image")[0].as_py() != jpeg


def test_decompression_bomb_is_bad_image(monkeypatch: pytest.MonkeyPatch) -> None:
    big = _encode(Image.new("RGB", (200, 200)), "PNG")
    # over 2x the limit Pillow raises itself; between 1x and 2x it only warns
    for limit, expected in ((100 * 100, "bad_image"), (30_000, "bad_image"), (40_000, None)):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        out = apply_image_checks(_table([big]), ImageConfig())
        assert out.column(DROP_COLUMN).to_pylist() == [expected], limit


def test_optional_images_and_earlier_drops() -> None:
    table = _table([None, b"junk", _encode(_pixels(32, 32), "PNG")])
    table = mark_dropped(table, np.array([0, 1, 0], bool), "junk_text")
    out = apply_image_checks(table, ImageConfig(required=False))
    assert out.column(DROP_COLUMN).to_pylist() == [None, "junk_text", None]
    assert out.column("image")[1].as_py() == b"junk"
    assert count_reasons(out) == {"junk_text": 1}


def test_never_raises_on_garbage() -> None:
    rng = np.random.default_rng(0)
    png = _encode(_pixels(20, 20), "PNG")
    garbage = [bytes(rng.integers(0, 256, n, dtype=np.uint8)) for n in (1, 10, 100, 1000)]
    garbage += [png[:n] for n in (8, 16, 33, 60, len(png) // 2)]
    garbage += [b"\x89PNG\r\n\x1a\n" + bytes(50), b"\xff\xd8\xff" + bytes(100), b"GIF89a"]
    out = apply_image_checks(_table(garbage), ImageConfig(min_size=1))
    assert set(out.column(DROP_COLUMN).to_pylist()) == {"bad_image"}
