"""Image decoding and the train/eval transforms, with PIL, numpy and torch only.

Augmentation randomness comes from `sample_rng(seed, epoch, uid)`, a pure function of its
arguments: the crop and flip a sample gets do not depend on which worker or rank loads it,
nor on the order it is loaded in, so runs are reproducible at any world size and a resumed
run sees the same pixels as one that never stopped.

Fast decode (``data.fast_decode``, `image_pixels(fast_decode=True)`): a JPEG is decoded at
the smallest DCT scale (1/8, 1/4, 1/2 or 1) at which the region that ends up in the output
still has at least ``image_size`` pixels on its shorter side, instead of at full size and
then mostly thrown away by the resize; the crop box is drawn in the original image's
coordinates (the same draws, so the same region of the photo) and mapped onto the reduced
image. The region is resized by torch's vectorized antialiased bicubic kernel on ``uint8``
rather than PIL's scalar one (2.5-4x faster on 256-800 px regions). The pixels differ
slightly from a full-size decode and PIL resize (libjpeg's scaled IDCT is a box-like
downsampling), which is why it is a recorded setting of the run: a resume with the other
setting is refused. Non-JPEG images decode at full size. torch's ``uint8`` resize has a
vectorized and a scalar code path, so fast-decoded pixels are reproducible on one kind of
CPU (every worker, rank and resume of a run), not promised across kinds of CPU.

Fast-decode pixels have versions (`FAST_DECODE_VERSION`, recorded in the loader state of
every checkpoint, so a run resumes with the pixels it started with): 1 resized a reduced
decode with PIL's bicubic on the exact fractional box; 2 (new runs) resizes every decode
with torch, the box mapped onto the reduced image's pixel grid (edges rounded to the
nearest reduced pixel: at most half a reduced pixel off the drawn region).

The pixels of a batch are normalized in one pass over the whole ``uint8`` batch
(`normalize_batch`), which computes exactly what the per-image float formula did.

Decoding, the eval resize / centre crop and the normalization are the model's inference
preprocessing, so they live in `kiln.models.preprocess` (curation's embed stage uses them
without importing training); they are re-exported here.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from kiln.models.jpeg import decode_jpeg, draft_scale, jpeg_size
from kiln.models.preprocess import (
    IMAGE_MEAN,
    IMAGE_STD,
    RESAMPLE,
    center_box,
    chw,
    decode_rgb,
    load_rgb,
    normalize_batch,
    open_image,
    preprocess_image,
    resize_center_crop,
    stack_pixels,
)

__all__ = [
    "FAST_DECODE_VERSION",
    "FAST_DECODE_VERSIONS",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "decode_rgb",
    "draft_factor",
    "image_pixels",
    "image_to_tensor",
    "normalize_batch",
    "open_image",
    "random_resized_crop_box",
    "sample_rng",
    "stack_pixels",
]

#: Versions of the fast-decode pixels (module docstring); new runs get the last.
FAST_DECODE_VERSIONS = (1, 2)
FAST_DECODE_VERSION = FAST_DECODE_VERSIONS[-1]

_CROP_SCALE = (0.6, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)


def sample_rng(seed: int, epoch: int, uid: str) -> np.random.Generator:
    """A generator seeded from blake2b of ``(seed, epoch, uid)``: same inputs, same draws."""
    digest = hashlib.blake2b(f"{seed}\x00{epoch}\x00{uid}".encode(), digest_size=16).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """A ``(left, top, right, bottom)`` box covering 60-100% of the area, aspect 3/4-4/3.

    torchvision's algorithm: ten tries at a random area and log-uniform aspect ratio, then
    a fallback to the largest centred crop whose aspect ratio is in range.
    """
    area = width * height
    log_lo, log_hi = math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*_CROP_SCALE)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < _CROP_RATIO[0]:
        w, h = width, round(width / _CROP_RATIO[0])
    elif in_ratio > _CROP_RATIO[1]:
        w, h = round(height * _CROP_RATIO[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def draft_factor(crop_width: float, crop_height: float, image_size: int) -> int:
    """The largest JPEG DCT reduction (8, 4, 2 or 1) that keeps a ``crop_width x
    crop_height`` region at least `image_size` pixels on its shorter side: the resize
    that follows then only ever shrinks, as it would from the full-size image."""
    shorter = min(crop_width, crop_height)
    for factor in (8, 4, 2):
        if shorter >= factor * image_size:
            return factor
    return 1


def _draft(img: Image.Image, factor: int) -> int:
    """Ask a JPEG to decode at 1/`factor` scale; returns the factor it will use (1 when
    the image is not a JPEG or cannot be reduced)."""
    if factor == 1 or img.format != "JPEG":
        return 1
    width, height = img.size
    got = img.draft("RGB", (width // factor, height // factor))
    if got is None:
        return 1
    return round(width / got[1][2])


def _check_args(image_size: int, augment: bool, rng: np.random.Generator | None) -> None:
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be positive")
    if augment and rng is None:
        raise ValueError(
            "image_to_tensor(augment=True) needs rng: pass sample_rng(seed, epoch, uid) so "
            "the augmentation is reproducible"
        )


def _flip(pixels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The horizontal flip with probability 1/2 (the draw after the crop box's)."""
    return pixels.flip(-1) if rng.random() < 0.5 else pixels


def _transform(
    img: Image.Image, image_size: int, augment: bool, rng: np.random.Generator | None
) -> torch.Tensor:
    """`image_to_tensor`'s geometry on a loaded RGB image: ``uint8 [3, S, S]``."""
    if augment:
        assert rng is not None
        box = random_resized_crop_box(img.width, img.height, rng)
        return _flip(chw(img.resize((image_size, image_size), RESAMPLE, box=box)), rng)
    return chw(resize_center_crop(img, image_size))


Pixels = Image.Image | np.ndarray  # a loaded RGB image, or its ``uint8 [H, W, 3]`` array


def _as_image(pixels: Pixels) -> Image.Image:
    return pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels, "RGB")


def _decode_for(
    data: bytes, img: Image.Image | None, size: tuple[int, int], factor: int
) -> tuple[Pixels, int]:
    """The RGB pixels of `data` decoded at the DCT scale PIL's ``Image.draft`` picks for a
    reduction by `factor`, and that scale. A JPEG `kiln.models.jpeg.jpeg_size` accepted
    (`img` None) is decoded by libjpeg-turbo directly, with PIL's pixels; anything else,
    or a JPEG libjpeg-turbo reports a problem with, by PIL (which names what is wrong)."""
    if img is None:
        scale = draft_scale(size[0], size[1], factor)
        pixels = decode_jpeg(data, size[0], size[1], scale)
        if pixels is not None:
            return pixels, scale
        img = open_image(data)
    scale = _draft(img, factor)
    return load_rgb(img, data), scale


def _grid_box(
    box: tuple[float, float, float, float], factor: int, width: int, height: int
) -> tuple[int, int, int, int]:
    """`box` (original-image coordinates) on the pixel grid of the image decoded at
    1/`factor` scale (`width` x `height`): each edge rounded to the nearest pixel, at
    least one pixel wide and high, inside the image."""
    left, top, right, bottom = (math.floor(v / factor + 0.5) for v in box)
    left, top = min(max(left, 0), width - 1), min(max(top, 0), height - 1)
    right, bottom = min(max(right, left + 1), width), min(max(bottom, top + 1), height)
    return left, top, right, bottom


def _fast_resize(
    pixels: Pixels,
    box: tuple[float, float, float, float],
    factor: int,
    size: int,
    version: int = FAST_DECODE_VERSION,
) -> torch.Tensor:
    """The region `box` (original-image coordinates) of `pixels` (decoded at 1/`factor`
    scale) resized to ``size x size``: ``uint8 [3, size, size]``, by torch's antialiased
    bicubic resize on ``uint8`` (vectorized where PIL's is not; the two agree to about one
    level in 255), the box on the decoded image's pixel grid. Version 1 resized a reduced
    image with PIL's bicubic on the box divided by `factor` (fractional coordinates)."""
    if factor > 1 and version == 1:
        left, top, right, bottom = box
        scaled = (left / factor, top / factor, right / factor, bottom / factor)
        return chw(_as_image(pixels).resize((size, size), RESAMPLE, box=scaled))
    image = chw(pixels)
    left, top, right, bottom = _grid_box(box, factor, image.shape[2], image.shape[1])
    crop = image[None, :, top:bottom, left:right]
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]


def image_pixels(
    data: bytes,
    image_size: int,
    *,
    augment: bool,
    rng: np.random.Generator | None,
    fast_decode: bool,
    fast_decode_version: int = FAST_DECODE_VERSION,
) -> torch.Tensor:
    """The ``uint8 [3, image_size, image_size]`` pixels of encoded image `data` after the
    train or eval transform (see `image_to_tensor`); normalize a batch of them with
    `normalize_batch`. May be a read-only or strided view: `normalize_batch` copies.

    ``fast_decode=False`` gives exactly ``image_to_tensor(decode_rgb(data), ...)``'s
    pixels. ``fast_decode=True`` decodes a JPEG at a reduced DCT scale and resizes with
    torch (module docstring); the crop box and flip are drawn as without it, from the
    original image size, so each sample shows the same region of the photo either way.
    `fast_decode_version`: which version of the fast-decode pixels (module docstring).
    """
    _check_args(image_size, augment, rng)
    if fast_decode and fast_decode_version not in FAST_DECODE_VERSIONS:
        raise ValueError(
            f"fast_decode_version={fast_decode_version} is not one of {FAST_DECODE_VERSIONS}"
        )
    if not fast_decode:
        return _transform(decode_rgb(data), image_size, augment, rng)
    size = jpeg_size(data)  # a JPEG libjpeg-turbo decodes as PIL would: no PIL image needed
    img = open_image(data) if size is None else None
    width, height = size or img.size  # type: ignore[union-attr]
    if not augment:
        box = center_box(width, height, image_size)
        wanted = draft_factor(box[2] - box[0], box[3] - box[1], image_size)
        pixels, factor = _decode_for(data, img, (width, height), wanted)
        if factor == 1:
            return chw(resize_center_crop(_as_image(pixels), image_size))
        return _fast_resize(pixels, box, factor, image_size, fast_decode_version)
    assert rng is not None
    crop = random_resized_crop_box(width, height, rng)
    wanted = draft_factor(crop[2] - crop[0], crop[3] - crop[1], image_size)
    pixels, factor = _decode_for(data, img, (width, height), wanted)
    return _flip(_fast_resize(pixels, crop, factor, image_size, fast_decode_version), rng)


def image_to_tensor(
    img: Image.Image,
    image_size: int,
    *,
    augment: bool,
    rng: np.random.Generator | None,
) -> torch.Tensor:
    """A normalized ``float32 [3, image_size, image_size]`` tensor of `img`.

    Eval (``augment=False``): resize the shorter side to `image_size`, centre crop.
    Train (``augment=True``): random resized crop (60-100% of the area) then a horizontal
    flip with probability 1/2, both drawn from `rng` (use `sample_rng`).
    """
    _check_args(image_size, augment, rng)
    if not augment:
        return preprocess_image(img, image_size)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return normalize_batch([_transform(img, image_size, augment, rng)])[0]
