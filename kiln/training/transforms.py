"""Image decoding and the train/eval transforms, with PIL and numpy only.

Augmentation randomness comes from `sample_rng(seed, epoch, uid)`, a pure function of its
arguments: the crop and flip a sample gets do not depend on which worker or rank loads it,
nor on the order it is loaded in, so runs are reproducible at any world size and a resumed
run sees the same pixels as one that never stopped.
"""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "decode_rgb",
    "image_to_tensor",
    "random_resized_crop_box",
    "sample_rng",
]

#: OpenAI CLIP's per-channel pixel statistics (RGB, on a 0-1 scale).
IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_CROP_SCALE = (0.6, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)
_RESAMPLE = Image.Resampling.BICUBIC


def decode_rgb(data: bytes) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, ...) into a fully loaded RGB image."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise ValueError(
            f"cannot decode {len(data)} bytes as an image ({type(e).__name__}: {e}): "
            "the sample's image is corrupt or not an image; curation drops such rows as "
            "'bad_image'"
        ) from e
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency onto white rather than letting it turn black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


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


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size`, then take the centred ``size x size`` square."""
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    img = img.resize((new_w, new_h), _RESAMPLE)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


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
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be positive")
    if img.mode != "RGB":
        img = img.convert("RGB")
    if augment:
        if rng is None:
            raise ValueError(
                "image_to_tensor(augment=True) needs rng: pass sample_rng(seed, epoch, uid) so "
                "the augmentation is reproducible"
            )
        box = random_resized_crop_box(img.width, img.height, rng)
        img = img.resize((image_size, image_size), _RESAMPLE, box=box)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
        img = _resize_center_crop(img, image_size)
    pixels = np.asarray(img, dtype=np.float32) / 255.0
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)
    std = np.asarray(IMAGE_STD, dtype=np.float32)
    pixels = (pixels - mean) / std
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
