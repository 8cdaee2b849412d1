"""img2dataset's resize modes on Pillow images, so a pool downloaded by kiln looks like one
downloaded by img2dataset with the same `resize_mode` and `image_size`.

- `no`: the image as it is;
- `keep_ratio`: the shorter side scaled to `size` (aspect ratio kept);
- `keep_ratio_largest`: the longer side scaled to `size`;
- `center_crop`: the shorter side scaled to `size`, then the central `size` x `size` square;
- `border`: the longer side scaled to `size`, then padded with white to `size` x `size`
  (the image centred; the odd pixel of padding goes to the bottom / right).

As in img2dataset, `only_if_bigger` leaves an image alone when it would have to grow
(for `center_crop` and `keep_ratio`: when its shorter side is at most `size`; for `border`
and `keep_ratio_largest`: its longer side), and new sizes are `round(side * scale)` with the
scaled side exactly `size`. Shrinking uses area averaging (Pillow's BOX filter: what OpenCV's
INTER_AREA, img2dataset's choice, computes), growing uses Lanczos. Pure functions: the same
image and arguments give the same pixels.
"""

from __future__ import annotations

from typing import Literal

from PIL import Image

__all__ = ["RESIZE_MODES", "ResizeMode", "resize_image"]

ResizeMode = Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
RESIZE_MODES: tuple[ResizeMode, ...] = (
    "no",
    "keep_ratio",
    "keep_ratio_largest",
    "center_crop",
    "border",
)
_WHITE = (255, 255, 255)


def _scale_to(image: Image.Image, side: int, size: int) -> Image.Image:
    """`image` scaled so that its side of length `side` becomes `size` (ratio kept)."""
    if side == size:
        return image
    width, height = image.size
    scale = size / side
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    new = (size if width == side else new[0], size if height == side else new[1])
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.LANCZOS
    return image.resize(new, resample)


def resize_image(
    image: Image.Image, mode: ResizeMode, size: int, *, only_if_bigger: bool = False
) -> Image.Image:
    """`image` (RGB) resized by `mode` to `size` (see module doc)."""
    if mode == "no":
        return image
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if mode in ("keep_ratio", "center_crop"):
        if only_if_bigger and short <= size:
            return image
        out = _scale_to(image, short, size)
        if mode == "keep_ratio":
            return out
        w, h = out.size
        left, top = (w - size) // 2, (h - size) // 2
        return out.crop((left, top, left + size, top + size))
    if mode in ("keep_ratio_largest", "border"):
        if only_if_bigger and long <= size:
            return image
        out = _scale_to(image, long, size)
        if mode == "keep_ratio_largest":
            return out
        w, h = out.size
        canvas = Image.new("RGB", (size, size), _WHITE)
        canvas.paste(out, ((size - w) // 2, (size - h) // 2))
        return canvas
    raise ValueError(f"resize mode {mode!r}: use one of {', '.join(RESIZE_MODES)}")
