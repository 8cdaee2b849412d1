"""What an image goes through before a kiln model sees it at inference: decode to RGB,
shorter side to the model's image size, centre crop, CLIP normalization.

PIL, numpy and torch only. `kiln eval`, `kiln.load_model` and curation's embed stage use it
(through `preprocess_image`); training's transforms (`kiln.training.transforms`) build
their augmentation and fast decode on these pieces, so train-time eval pixels and
inference pixels are one piece of code.
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kiln.models.jpeg import decode_jpeg, jpeg_size

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "RESAMPLE",
    "ImageLike",
    "as_pil",
    "center_box",
    "chw",
    "decode_rgb",
    "load_rgb",
    "normalize_batch",
    "normalize_pixels",
    "open_image",
    "preprocess_image",
    "resize_center_crop",
    "stack_pixels",
]

#: OpenAI CLIP's per-channel pixel statistics (RGB, on a 0-1 scale).
IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
#: The resampling filter of every PIL resize.
RESAMPLE = Image.Resampling.BICUBIC

#: An image as kiln's Python API takes it: a PIL image, an image file's path, or its bytes.
ImageLike = Image.Image | str | Path | bytes


@functools.cache
def _normalization(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(255, mean, std) as float32 tensors on `device`, made once per device. The divisor
    is a tensor, not a Python number: CUDA divides by a number as a multiplication by its
    reciprocal, which can round differently; by a tensor it divides, as the CPU does."""
    return (
        torch.tensor(255.0, dtype=torch.float32, device=device),
        torch.tensor(IMAGE_MEAN, dtype=torch.float32, device=device).reshape(1, 3, 1, 1),
        torch.tensor(IMAGE_STD, dtype=torch.float32, device=device).reshape(1, 3, 1, 1),
    )


def _bad_image(data: bytes, e: Exception) -> ValueError:
    return ValueError(
        f"cannot decode {len(data)} bytes as an image ({type(e).__name__}: {e}): "
        "the sample's image is corrupt or not an image; curation drops such rows as "
        "'bad_image'"
    )


def open_image(data: bytes) -> Image.Image:
    """Encoded image bytes opened lazily: the header is read (size, format), not the pixels.

    `Image.draft` can still pick a reduced JPEG decoding scale before `load_rgb` decodes.
    """
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:
        raise _bad_image(data, e) from e


def load_rgb(img: Image.Image, data: bytes) -> Image.Image:
    """Decode the pixels of an opened image and bring them to RGB (no copy when they are)."""
    try:
        img.load()
    except Exception as e:
        raise _bad_image(data, e) from e
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency onto white rather than letting it turn black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, ...) into a fully loaded RGB image.

    A JPEG that `kiln.models.jpeg` decodes as PIL would is decoded there (the same pixels,
    without PIL's header parsing in Python: about a quarter of the CPU on a small image);
    anything else, or a JPEG libjpeg-turbo reports a problem with, by PIL."""
    size = jpeg_size(data)
    if size is not None:
        pixels = decode_jpeg(data, size[0], size[1], 1)
        if pixels is not None:
            return Image.fromarray(pixels)
    return load_rgb(open_image(data), data)


def as_pil(image: ImageLike) -> Image.Image:
    """A PIL image of `image`; a path or bytes are decoded to RGB (`decode_rgb`)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, bytes):
        return decode_rgb(image)
    return decode_rgb(Path(image).read_bytes())


def center_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The region of a ``width x height`` image that `resize_center_crop` keeps."""
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size`, then take the centred ``size x size`` square."""
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    img = img.resize((new_w, new_h), RESAMPLE)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def chw(img: Image.Image | np.ndarray) -> torch.Tensor:
    """A loaded RGB image (or its ``uint8 [H, W, 3]`` array) as ``uint8 [3, H, W]``: a view
    of its pixel bytes (no copy beyond PIL's own export; read-only, which is fine for
    everything that reads it here)."""
    with warnings.catch_warnings():  # torch warns once about the read-only buffer
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)


def stack_pixels(pixels: Sequence[torch.Tensor]) -> torch.Tensor:
    """``uint8 [3, S, S]`` images -> one contiguous ``uint8 [B, 3, S, S]`` batch: what a
    loader hands its rank (a quarter of the bytes of the normalized batch)."""
    return torch.stack(list(pixels))


def normalize_pixels(batch: torch.Tensor) -> torch.Tensor:
    """A ``uint8 [B, 3, S, S]`` batch -> normalized contiguous ``float32 [B, 3, S, S]`` on
    the batch's device.

    One conversion to float, then the same float32 operations, in the same order, as
    ``((x / 255) - mean) / std`` on each image (in place), so the values are bitwise those
    of the per-image formula, on a GPU as on the CPU (IEEE division and subtraction).
    """
    scale, mean, std = _normalization(batch.device)
    out = batch.to(dtype=torch.float32, memory_format=torch.contiguous_format)
    return out.div_(scale).sub_(mean).div_(std)


def normalize_batch(pixels: Sequence[torch.Tensor]) -> torch.Tensor:
    """``uint8 [3, S, S]`` images -> normalized ``float32 [B, 3, S, S]`` (contiguous):
    `normalize_pixels` of `stack_pixels`."""
    return normalize_pixels(stack_pixels(pixels))


def preprocess_image(img: Image.Image, image_size: int) -> torch.Tensor:
    """The normalized ``float32 [3, image_size, image_size]`` eval tensor of `img`: RGB,
    shorter side resized to `image_size`, centre crop, CLIP normalization."""
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be positive")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return normalize_batch([chw(resize_center_crop(img, image_size))])[0]
