"""Image decoding and transforms: RGB conversion, eval crop geometry, seeded augmentation."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.models.jpeg import draft_scale
from kiln.models.preprocess import center_box, chw
from kiln.training.transforms import (
    FAST_DECODE_VERSION,
    IMAGE_MEAN,
    IMAGE_STD,
    _draft,
    _grid_box,
    decode_rgb,
    draft_factor,
    image_pixels,
    image_to_tensor,
    normalize_batch,
    open_image,
    random_resized_crop_box,
    sample_rng,
)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _pixels(t: torch.Tensor) -> np.ndarray:
    """Undo the normalization: ``[3, S, S]`` tensor -> ``[S, S, 3]`` values in 0-255."""
    mean = torch.tensor(IMAGE_MEAN)[:, None, None]
    std = torch.tensor(IMAGE_STD)[:, None, None]
    return ((t * std + mean) * 255).permute(1, 2, 0).numpy()


def test_decode_rgb_modes() -> None:
    gray = decode_rgb(_encode(Image.new("L", (5, 4), 100), "PNG"))
    assert gray.mode == "RGB" and gray.size == (5, 4) and gray.getpixel((0, 0)) == (100,) * 3
    clear = decode_rgb(_encode(Image.new("RGBA", (3, 3), (255, 0, 0, 0)), "PNG"))
    assert clear.getpixel((1, 1)) == (255, 255, 255)  # transparent -> white, not black
    jpg = decode_rgb(_encode(Image.new("RGB", (8, 8), (0, 0, 255)), "JPEG"))
    assert jpg.mode == "RGB" and jpg.size == (8, 8)


def test_decode_rgb_bad_bytes_names_the_problem() -> None:
    with pytest.raises(ValueError, match="cannot decode 9 bytes"):
        decode_rgb(b"not a jpg")
    truncated = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")[:40]
    with pytest.raises(ValueError, match="cannot decode"):
        decode_rgb(truncated)


def test_eval_transform_normalizes_and_centre_crops() -> None:
    # A 40x20 image: 5 red columns, 30 green, 5 blue.
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :5] = (255, 0, 0)
    arr[:, 5:35] = (0, 255, 0)
    arr[:, 35:] = (0, 0, 255)
    out = image_to_tensor(Image.fromarray(arr), 8, augment=False, rng=None)
    assert out.dtype == torch.float32 and out.shape == (3, 8, 8)
    # Shorter side 20 -> 8 makes it 16 wide (2 red, 12 green, 2 blue columns); the centred
    # 8 columns are green only, while a left-aligned or uncropped resize would show red.
    np.testing.assert_allclose(_pixels(out), np.broadcast_to([0, 255, 0], (8, 8, 3)), atol=0.5)
    # A uniform image of the mean colour normalizes to zero.
    mean_rgb = tuple(round(255 * m) for m in IMAGE_MEAN)
    flat = image_to_tensor(Image.new("RGB", (10, 10), mean_rgb), 4, augment=False, rng=None)
    assert flat.abs().max().item() < 0.01


def test_augmentation_is_a_function_of_seed_epoch_uid() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    a = image_to_tensor(img, 16, augment=True, rng=sample_rng(7, 2, "uid-a"))
    b = image_to_tensor(img, 16, augment=True, rng=sample_rng(7, 2, "uid-a"))
    assert a.shape == (3, 16, 16) and torch.equal(a, b)
    # Changing any of the three inputs changes the draws (checked over a few uids/epochs).
    others = [("uid-b", 2, 7), ("uid-a", 3, 7), ("uid-a", 2, 8)]
    for uid, epoch, seed in others:
        c = image_to_tensor(img, 16, augment=True, rng=sample_rng(seed, epoch, uid))
        assert not torch.equal(a, c), (uid, epoch, seed)
    # pinned: a change to the seeding would change every augmentation of every saved run
    assert sample_rng(1, 0, "x").integers(0, 2**62) == 4168703448472968866


def test_random_resized_crop_box_bounds() -> None:
    flips = 0
    for i in range(200):
        rng = sample_rng(0, 0, str(i))
        left, top, right, bottom = random_resized_crop_box(100, 50, rng)
        assert 0 <= left < right <= 100 and 0 <= top < bottom <= 50
        frac = (right - left) * (bottom - top) / 5000
        assert 0.55 <= frac <= 1.0, frac
        flips += rng.random() < 0.5
    assert 60 < flips < 140  # the flip draw after the crop is a fair coin


def test_augment_flip_mirrors_an_image() -> None:
    """With a full-image crop the only difference between two draws is the flip."""
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[:, :8] = 255  # left half white
    img = Image.fromarray(arr)
    outs = {}
    for i in range(64):
        rng = sample_rng(0, 0, str(i))
        t = image_to_tensor(img, 16, augment=True, rng=rng)
        left_bright = bool(t[:, :, :4].mean() > t[:, :, -4:].mean())
        outs[left_bright] = True
    assert outs == {True: True, False: True}


def test_augment_requires_rng() -> None:
    with pytest.raises(ValueError, match="sample_rng"):
        image_to_tensor(Image.new("RGB", (8, 8)), 8, augment=True, rng=None)


# ------------------------------------------------------------------ loader decode path


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour field with some texture: JPEG-like content, not white noise."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    rng = np.random.default_rng(seed)
    arr = np.stack(
        [
            128
            + 100 * np.sin(xx / (25 + 9 * c) + yy / (31 + 7 * c) + c)
            + rng.normal(0, 4, xx.shape)
            for c in range(3)
        ],
        axis=-1,
    )
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _level_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two uint8 images, in levels of 255."""
    return float((a.int() - b.int()).abs().float().mean())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("augment", [True, False])
def test_image_pixels_without_fast_decode_equals_image_to_tensor_bitwise(
    fmt: str, augment: bool
) -> None:
    data = _encode(_photo(96, 64), fmt)
    gray = _encode(_photo(40, 30).convert("L"), fmt)
    for i, blob in enumerate([data, gray]):
        uid = f"u{i}"
        want = image_to_tensor(
            decode_rgb(blob), 16, augment=augment, rng=sample_rng(3, 1, uid) if augment else None
        )[None]
        rng = sample_rng(3, 1, uid) if augment else None
        pixels = image_pixels(blob, 16, augment=augment, rng=rng, fast_decode=False)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 16, 16)
        assert torch.equal(normalize_batch([pixels]), want)


def test_normalize_batch_is_the_per_image_formula() -> None:
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    imgs.append(np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3))  # every level
    # HWC images seen as CHW (strided views, as image_pixels gives them) and a contiguous one
    views = [torch.from_numpy(img).permute(2, 0, 1) for img in imgs]
    views[1] = views[1].contiguous()
    got = normalize_batch(views)
    assert got.shape == (4, 3, 16, 16) and got.dtype == torch.float32 and got.is_contiguous()
    for i, img in enumerate(imgs):
        pixels = np.asarray(img, dtype=np.float32) / 255.0
        mean = np.asarray(IMAGE_MEAN, dtype=np.float32)
        want = ((pixels - mean) / np.asarray(IMAGE_STD, dtype=np.float32)).transpose(2, 0, 1)
        assert torch.equal(got[i], torch.from_numpy(np.ascontiguousarray(want)))


def test_draft_factor_keeps_the_crop_at_least_the_output_size() -> None:
    assert draft_factor(512, 400, 32) == 8  # 400 / 8 = 50 >= 32
    assert draft_factor(512, 255, 32) == 4  # 255 / 8 < 32, 255 / 4 >= 32
    assert draft_factor(448, 500, 224) == 2
    assert draft_factor(447, 500, 224) == 1
    assert draft_factor(100, 100, 224) == 1  # an upscale never decodes smaller


def test_fast_decode_decodes_a_jpeg_at_reduced_scale() -> None:
    img = open_image(_encode(_photo(400, 300), "JPEG"))
    assert _draft(img, draft_factor(400, 300, 32)) == 8
    img.load()
    assert img.size == (50, 38)  # ceil(400 / 8), ceil(300 / 8): an eighth of the pixels
    png = open_image(_encode(_photo(400, 300), "PNG"))
    assert _draft(png, 8) == 1  # only JPEG has DCT scaling


def _full_decode_of(data: bytes, size: int, uid: str | None, version: int) -> torch.Tensor:
    """What fast decode approximates: the full-size decode resized by PIL from the region
    it shows (version 1: the drawn box; version 2: that box on the reduced image's grid)."""
    img = decode_rgb(data)
    width, height = img.size
    rng = sample_rng(0, 0, uid) if uid is not None else None
    box: tuple[float, ...] = (
        random_resized_crop_box(width, height, rng) if rng else center_box(width, height, size)
    )
    factor = draft_scale(width, height, draft_factor(box[2] - box[0], box[3] - box[1], size))
    if version == 2:
        grid = _grid_box(box, factor, -(-width // factor), -(-height // factor))  # type: ignore[arg-type]
        box = tuple(
            min(v * factor, edge) for v, edge in zip(grid, (width, height) * 2, strict=True)
        )
    pixels = chw(img.resize((size, size), Image.Resampling.BICUBIC, box=box))
    return pixels.flip(-1) if rng is not None and rng.random() < 0.5 else pixels


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("size", [16, 48])
def test_fast_decode_is_deterministic_and_close_to_the_full_decode(size: int, version: int) -> None:
    data = _encode(_photo(320, 240), "JPEG")
    for uid in [f"uid-{i}" for i in range(12)] + [None]:  # None: the eval centre crop
        kw = {"augment": uid is not None, "fast_decode": True, "fast_decode_version": version}
        fast = image_pixels(data, size, rng=sample_rng(0, 0, uid) if uid else None, **kw)  # type: ignore[arg-type]
        again = image_pixels(data, size, rng=sample_rng(0, 0, uid) if uid else None, **kw)  # type: ignore[arg-type]
        assert fast.shape == (3, size, size) and fast.dtype == torch.uint8
        assert torch.equal(fast, again)
        # the same region and flip, a slightly different downsampling: a few levels at most
        assert _level_diff(fast, _full_decode_of(data, size, uid, version)) < 4.0, uid


#: sha256 of `_versions_digest(1)`: the pixels fast decode gave before it had versions
#: (kiln a5a9063), which a run started then must keep getting when it resumes.
FAST_DECODE_V1_SHA256 = "f80ed20f7bcf4e8f43b75da5056a8ab3f454190aa27682caeed008c5954295e9"


def _versions_digest(version: int) -> tuple[str, list[torch.Tensor]]:
    """Train and eval pixels of a 400x300 JPEG at 32 px, eight crops: all decoded at 1/8."""
    data = _encode(_photo(400, 300), "JPEG")
    h, out = hashlib.sha256(), []
    for i in range(8):
        for augment in (True, False):
            rng = sample_rng(0, 0, f"uid-{i}") if augment else None
            pixels = image_pixels(
                data, 32, augment=augment, rng=rng, fast_decode=True, fast_decode_version=version
            )
            h.update(pixels.contiguous().numpy().tobytes())
            out.append(pixels)
    return h.hexdigest(), out


def test_fast_decode_versions_keep_their_pixels() -> None:
    v1_digest, v1 = _versions_digest(1)
    assert v1_digest == FAST_DECODE_V1_SHA256  # PIL's resize only: the same on every CPU
    assert FAST_DECODE_VERSION == 2
    _, v2 = _versions_digest(2)
    assert any(not torch.equal(a, b) for a, b in zip(v1, v2, strict=True))
    # the same regions on a grid half a reduced pixel away, resized by another kernel
    assert max(_level_diff(a, b) for a, b in zip(v1, v2, strict=True)) < 8.0
    with pytest.raises(ValueError, match="fast_decode_version=3 is not one of"):
        image_pixels(b"", 8, augment=False, rng=None, fast_decode=True, fast_decode_version=3)


def test_grid_box_rounds_each_edge_and_stays_inside() -> None:
    assert _grid_box((10.2, 3.7, 50.9, 41.0), 2, 40, 30) == (5, 2, 25, 21)
    assert _grid_box((76, 4, 391, 282), 1, 400, 300) == (76, 4, 391, 282)  # whole pixels
    assert _grid_box((-3.0, 0.0, 999.0, 2.0), 8, 50, 38) == (0, 0, 50, 1)  # >= 1 pixel


def test_fast_decode_on_real_photos(shared_data: Path) -> None:
    """The web-crawled shard's photos (~512-800 px) at the tiny and ViT sizes."""
    with tarfile.open(shared_data / "cc12m_wds_shard" / "cc12m-train-0000.tar") as tar:
        blobs = [
            tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar
            if m.name.endswith(".jpg")
        ][:8]
    for size in (32, 224):
        for i, data in enumerate(blobs):
            kw = {"augment": True, "rng": sample_rng(1, 0, str(i))}
            fast = image_pixels(data, size, fast_decode=True, **kw)  # type: ignore[arg-type]
            kw["rng"] = sample_rng(1, 0, str(i))
            full = image_pixels(data, size, fast_decode=False, **kw)  # type: ignore[arg-type]
            assert _level_diff(fast, full) < 8.0, (size, i)


def test_bad_bytes_fail_the_same_way_in_both_decode_modes() -> None:
    for fast in (True, False):
        with pytest.raises(ValueError, match="cannot decode 9 bytes"):
            image_pixels(b"not a jpg", 8, augment=False, rng=None, fast_decode=fast)
    truncated = _encode(_photo(64, 64), "JPEG")[:200]
    with pytest.raises(ValueError, match="cannot decode"):
        image_pixels(truncated, 8, augment=False, rng=None, fast_decode=True)
