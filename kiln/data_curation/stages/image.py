"""Image stage: decode check, size and aspect filters, RGB JPEG re-encoding, content hash.

For each alive row: no bytes -> `missing_image` (when `ImageConfig.required`); bytes that
Pillow cannot open and fully decode (truncated files, garbage, decompression bombs larger
than `PIL.Image.MAX_IMAGE_PIXELS`, kept on even when another library turned it off) ->
`bad_image`; the shorter side under `min_size` ->
`image_too_small`; longer / shorter side over `max_aspect_ratio` -> `bad_aspect_ratio`.
Kept rows come out as RGB JPEG bytes in `image` (EXIF orientation applied, transparency
composited on white, longer side resized to `max_size` with Lanczos when it is larger).
An RGB JPEG that needs none of that keeps its original bytes; everything else is
re-encoded with `jpeg_quality` (same input, same bytes).

`image_sha256` hashes the decoded RGB pixels plus the size (before any resize), so the same
picture stored as PNG and as another PNG, or as the same JPEG under two URLs, gets one hash
whatever the encoding; the runner drops all but one row per hash (`duplicate_image`).
The function never raises on bad bytes: every failure becomes a drop reason.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps
from pydantic import Field

from kiln.contracts import StrictModel
from kiln.data_curation.stage import MapStage, register
from kiln.data_curation.stages import alive_mask, mark_dropped, replace_column

__all__ = [
    "PILLOW_MAX_IMAGE_PIXELS",
    "DecodedImage",
    "ImageConfig",
    "ImageStage",
    "apply_image_checks",
    "decode_rgb",
    "encode_jpeg",
    "max_pixels",
    "pixel_sha256",
]


class ImageConfig(StrictModel):
    """Image decode check, size filters, re-encoding for shards."""

    required: bool = Field(default=True, description="drop rows with no image bytes")
    min_size: int = Field(default=16, ge=1, description="minimum of width and height, pixels")
    max_aspect_ratio: float = Field(
        default=3.0, ge=1.0, description="longer side / shorter side above this is dropped"
    )
    max_size: int | None = Field(
        default=None, ge=16, description="resize so the longer side is at most this (None: keep)"
    )
    jpeg_quality: int = Field(
        default=90,
        ge=1,
        le=100,
        description="JPEG quality of images re-encoded for the shards (plain RGB JPEGs are "
        "kept byte for byte unless resized)",
    )


_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class DecodedImage:
    """An image decoded to RGB, and whether its source bytes are already a plain RGB JPEG."""

    image: Image.Image
    plain_jpeg: bool


def pixel_sha256(image: Image.Image) -> str:
    """sha256 over "{width}x{height}:" and the RGB pixel bytes: a hash of content, not encoding."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (not onto black garbage)."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


#: Pillow's own default for `PIL.Image.MAX_IMAGE_PIXELS` (about 0.25 GB of RGB).
PILLOW_MAX_IMAGE_PIXELS = 89_478_485


def max_pixels() -> int:
    """The decompression-bomb bound images are checked against before they are decoded:
    `PIL.Image.MAX_IMAGE_PIXELS`, or Pillow's default when something set it to None (some
    libraries turn the guard off on import; kiln keeps it on)."""
    limit = Image.MAX_IMAGE_PIXELS
    return int(limit) if limit is not None else PILLOW_MAX_IMAGE_PIXELS


def decode_rgb(data: bytes) -> DecodedImage:
    """Open and fully decode `data` to an upright RGB image; raises on any bad input.

    Raises `ValueError` for images over `max_pixels()` (decompression bombs: checked from
    the header, before any pixel is decoded) and whatever Pillow raises for truncated or
    unreadable bytes.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
    width, height = image.size
    limit = max_pixels()
    if width * height > limit:
        raise ValueError(f"{width}x{height} image exceeds MAX_IMAGE_PIXELS={limit}")
    if width < 1 or height < 1:
        raise ValueError(f"image has size {width}x{height}")
    image.load()
    source_format = image.format
    orientation = image.getexif().get(0x0112, 1)
    upright = ImageOps.exif_transpose(image) if orientation not in (None, 1) else image
    plain_jpeg = source_format == "JPEG" and image.mode == "RGB" and orientation in (None, 1)
    return DecodedImage(image=_to_rgb(upright), plain_jpeg=plain_jpeg)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Baseline (non-progressive, unoptimized) JPEG bytes of `image`: same pixels, same bytes."""
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, optimize=False, progressive=False)
    return out.getvalue()


def _resized(image: Image.Image, max_size: int | None) -> Image.Image:
    if max_size is None or max(image.size) <= max_size:
        return image
    width, height = image.size
    scale = max_size / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    size = (max_size, size[1]) if width >= height else (size[0], max_size)
    return image.resize(size, Image.Resampling.LANCZOS)


def apply_image_checks(table: pa.Table, cfg: ImageConfig) -> pa.Table:
    """Decode, filter, normalize and hash the `image` column of alive rows (see module doc).

    Sets `image` (binary), `width`/`height` (int32, of the stored image) and `image_sha256`
    (string). Dropped rows keep their original bytes so the rejects table shows them;
    rows dropped before this stage are not touched.
    """
    n = table.num_rows
    has_images = "image" in table.column_names
    images = table.column("image").to_pylist() if has_images else [None] * n
    alive = alive_mask(table)
    widths = _int_column(table, "width")
    heights = _int_column(table, "height")
    hashes: list[str | None] = [None] * n
    out: list[bytes | None] = list(images)
    missing = np.zeros(n, dtype=bool)
    bad = np.zeros(n, dtype=bool)
    small = np.zeros(n, dtype=bool)
    aspect = np.zeros(n, dtype=bool)
    for i, data in enumerate(images):
        if not alive[i]:
            continue
        if not data:
            missing[i] = cfg.required
            continue
        try:
            decoded = decode_rgb(bytes(data))
        except Exception:
            bad[i] = True
            continue
        image = decoded.image
        width, height = image.size
        widths[i], heights[i] = width, height
        if min(width, height) < cfg.min_size:
            small[i] = True
            continue
        if max(width, height) / min(width, height) > cfg.max_aspect_ratio:
            aspect[i] = True
            continue
        hashes[i] = pixel_sha256(image)
        final = _resized(image, cfg.max_size)
        if final is image and decoded.plain_jpeg:
            out[i] = bytes(data)
        else:
            try:
                out[i] = encode_jpeg(final, cfg.jpeg_quality)
            except Exception:
                bad[i] = True
                hashes[i] = None
                continue
        widths[i], heights[i] = final.size
    table = replace_column(table, "image", pa.array(out, type=pa.binary()))
    table = replace_column(table, "width", pa.array(widths, type=pa.int32()))
    table = replace_column(table, "height", pa.array(heights, type=pa.int32()))
    table = replace_column(table, "image_sha256", pa.array(hashes, type=pa.string()))
    table = mark_dropped(table, missing, "missing_image")
    table = mark_dropped(table, bad, "bad_image")
    table = mark_dropped(table, small, "image_too_small")
    return mark_dropped(table, aspect, "bad_aspect_ratio")


def _int_column(table: pa.Table, name: str) -> list[int | None]:
    if name not in table.column_names:
        return [None] * table.num_rows
    return [v if isinstance(v, int) else None for v in table.column(name).to_pylist()]


class ImageStage(MapStage[ImageConfig]):
    """Decode check, size and aspect filters, RGB JPEG re-encoding and the pixel hash."""

    name = "image"
    config = ImageConfig
    summary = "decode, size/aspect filters, RGB JPEG re-encode, pixel sha256"
    adds = ("image", "width", "height", "image_sha256")
    images = True
    batch_rows = 256
    drop_reasons: ClassVar[dict[str, str]] = {
        "missing_image": "no image bytes (image.required is on)",
        "bad_image": "the bytes do not decode as an image (or exceed MAX_IMAGE_PIXELS)",
        "image_too_small": "shorter side under image.min_size",
        "bad_aspect_ratio": "longer over shorter side above image.max_aspect_ratio",
    }

    def apply(self, table: pa.Table, cfg: ImageConfig, ctx: Any) -> pa.Table:
        return apply_image_checks(table, cfg)


register(ImageStage())
