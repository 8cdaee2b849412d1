"""JPEG decoding straight into numpy through libjpeg-turbo (simplejpeg), at a DCT scale.

PIL decodes JPEGs with the same library and the same settings (accurate integer IDCT,
fancy upsampling), so the pixels are the same; going around PIL skips its image object,
its chunked decoder feed and the export copy: 1.65 ms instead of 2.78 ms per 512-840 px
web photo at full size, 1.26 instead of 1.54 at a quarter of it, 24 instead of 98 us per
64 px image (one core). `kiln.models.preprocess.decode_rgb` (every full-size decode:
training without fast decode, evaluation, inference) and the training loader's fast decode
(`kiln.training.transforms.image_pixels`, at the DCT scale PIL's ``Image.draft`` would
pick: `draft_scale`) use it for the JPEGs PIL would decode the same way; anything else
(PNG, WebP, CMYK, multi-picture MPO files, images under `MIN_SIDE` pixels or over PIL's
decompression-bomb limit, data libjpeg-turbo warns about) goes through PIL, whose errors
name what is wrong. ``tests/unit/test_jpeg.py`` checks the equality on real photos.
"""

from __future__ import annotations

import numpy as np
import simplejpeg
from PIL import Image

__all__ = ["MIN_SIDE", "decode_jpeg", "draft_scale", "jpeg_size"]

#: Smaller JPEGs go through PIL: at a few pixels two DCT scales can give the same output
#: size, and libjpeg-turbo might pick another one than PIL.
MIN_SIDE = 16
_SCALES = (8, 4, 2, 1)
# How far into the file an MPO's "MPF" APP2 segment can be: after SOI and an APP1 (EXIF)
# of at most 64 KiB. PIL opens such files as MPO and never drafts them.
_MPF_SCAN = 2 + 4 + 65535 + 16


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG this module decodes as PIL would (YCbCr or grayscale,
    not MPO, at least `MIN_SIDE` pixels a side, within PIL's decompression-bomb limit
    ``Image.MAX_IMAGE_PIXELS``, so PIL warns or refuses as it would); None for anything
    else."""
    if data[:2] != b"\xff\xd8" or b"MPF\x00" in data[:_MPF_SCAN]:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray") or min(width, height) < MIN_SIDE:
        return None
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        return None
    return int(width), int(height)


def draft_scale(width: int, height: int, factor: int) -> int:
    """The DCT scale (8, 4, 2 or 1) ``Image.draft("RGB", (width // factor, height //
    factor))`` picks for a JPEG of ``width x height``: the largest that is at most both
    ``width // (width // factor)`` and ``height // (height // factor)``."""
    if factor <= 1:
        return 1
    request = (max(1, width // factor), max(1, height // factor))
    most = min(width // request[0], height // request[1])
    return next(s for s in _SCALES if most >= s)


def decode_jpeg(data: bytes, width: int, height: int, scale: int) -> np.ndarray | None:
    """RGB pixels ``uint8 [ceil(height / scale), ceil(width / scale), 3]`` of a JPEG that
    `jpeg_size` accepted, decoded at DCT scale 1/`scale`; None when libjpeg-turbo reports
    an error or a warning (corrupt or truncated data: the caller's PIL path then says
    what is wrong) or gives another size."""
    out_w, out_h = -(-width // scale), -(-height // scale)
    try:
        pixels = simplejpeg.decode_jpeg(
            data, "RGB", min_height=out_h, min_width=out_w, min_factor=scale, strict=True
        )
    except ValueError:
        return None
    if pixels.shape != (out_h, out_w, 3):
        return None
    return pixels
