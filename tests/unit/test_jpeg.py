"""`kiln.models.jpeg`: libjpeg-turbo's decode straight into numpy gives PIL's pixels, at
the DCT scale PIL's draft picks, on real photos; what it does not decode as PIL would goes
to PIL; and the loader's fast decode gives the same pixels either way."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln.models import jpeg
from kiln.models.preprocess import decode_rgb, load_rgb, open_image
from kiln.training import transforms
from kiln.training.transforms import image_pixels, sample_rng


def real_jpegs(shared_data: Path) -> list[bytes]:
    """Web photos (512-840 px, the cc12m shard), Flickr8k (mostly 200x150, one grayscale
    among them here) and COCO (~640 px, 4:4:4 and 4:2:0 chroma)."""
    with tarfile.open(shared_data / "cc12m_wds_shard" / "cc12m-train-0000.tar") as tar:
        out = [
            tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.name.endswith(".jpg")
        ]
    flickr = sorted((shared_data / "flickr8k_1k" / "images").glob("*.jpg"))[:40]
    coco = sorted((shared_data / "coco_mini").glob("*/*.jpg"))[:24]
    return out + [p.read_bytes() for p in flickr + coco]


def pil_draft(data: bytes, factor: int) -> np.ndarray:
    img = open_image(data)
    if factor > 1:
        img.draft("RGB", (img.width // factor, img.height // factor))
    return np.asarray(load_rgb(img, data))


def test_same_pixels_as_pil_at_every_draft_request(shared_data: Path) -> None:
    photos = real_jpegs(shared_data)
    assert len(photos) > 80
    for data in photos:
        size = jpeg.jpeg_size(data)
        assert size == open_image(data).size
        for factor in (1, 2, 3, 4, 8):
            scale = jpeg.draft_scale(size[0], size[1], factor)
            ours = jpeg.decode_jpeg(data, size[0], size[1], scale)
            assert ours is not None
            theirs = pil_draft(data, factor)
            assert ours.shape == theirs.shape and np.array_equal(ours, theirs), (size, factor)


def test_decode_rgb_gives_pils_pixels(shared_data: Path) -> None:
    """Every full-size decode (training without fast decode, eval, inference) goes through
    libjpeg-turbo directly where it can, with PIL's pixels: real photos, and the small
    generated JPEGs of the quickstart's pool."""
    rng = np.random.default_rng(0)
    small = [
        encoded(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), quality=q)
        for q in (60, 95)
    ]
    for data in real_jpegs(shared_data)[::2] + small:
        assert jpeg.jpeg_size(data) is not None  # decoded by libjpeg-turbo directly
        ours = decode_rgb(data)
        assert ours.mode == "RGB"
        assert np.array_equal(np.asarray(ours), pil_draft(data, 1))


def test_decompression_bombs_are_left_to_pil(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encoded(Image.new("RGB", (64, 48), (10, 20, 30)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns above, refuses at 2x
    assert jpeg.jpeg_size(data) is None
    with pytest.raises(ValueError, match="DecompressionBombError"):
        decode_rgb(data)


def test_the_loaders_fast_decode_gives_the_pixels_of_the_pil_path(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = real_jpegs(shared_data)[::3]

    def run(augment: bool, size: int) -> list[np.ndarray]:
        return [
            image_pixels(
                data, size, augment=augment, rng=sample_rng(0, 1, str(i)), fast_decode=True
            ).numpy()
            for i, data in enumerate(photos)
        ]

    cases = [(augment, size) for augment in (True, False) for size in (32, 224)]
    ours = {case: run(*case) for case in cases}
    monkeypatch.setattr(transforms, "jpeg_size", lambda data: None)  # PIL for everything
    for case in cases:
        theirs = run(*case)
        for i, (a, b) in enumerate(zip(ours[case], theirs, strict=True)):
            assert np.array_equal(a, b), (case, i)


def encoded(img: Image.Image, fmt: str = "JPEG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_what_pil_decodes_otherwise_is_left_to_pil() -> None:
    rgb = Image.linear_gradient("L").convert("RGB").resize((64, 48))
    assert jpeg.jpeg_size(encoded(rgb)) == (64, 48)
    gray = encoded(rgb.convert("L"))
    assert jpeg.jpeg_size(gray) == (64, 48)  # grayscale: PIL's L -> RGB is libjpeg's too
    assert np.array_equal(jpeg.decode_jpeg(gray, 64, 48, 1), pil_draft(gray, 1))
    assert jpeg.jpeg_size(encoded(rgb.convert("CMYK"))) is None  # PIL's own CMYK -> RGB
    assert jpeg.jpeg_size(encoded(rgb, "PNG")) is None
    assert jpeg.jpeg_size(encoded(rgb.resize((12, 40)))) is None  # under MIN_SIDE
    mpo = encoded(rgb, "MPO", save_all=True, append_images=[rgb.rotate(90)])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    assert jpeg.jpeg_size(mpo) is None  # PIL never drafts an MPO
    assert jpeg.jpeg_size(b"not an image") is None


def test_corrupt_jpeg_is_pil_s_error() -> None:
    data = encoded(Image.effect_noise((64, 64), 40).convert("RGB"))
    truncated = data[: len(data) // 2]
    assert jpeg.jpeg_size(truncated) == (64, 64)  # the header is whole
    assert jpeg.decode_jpeg(truncated, 64, 64, 1) is None  # libjpeg-turbo's warning
    rng = sample_rng(0, 0, "x")
    with pytest.raises(ValueError, match=r"cannot decode \d+ bytes as an image"):
        image_pixels(truncated, 32, augment=True, rng=rng, fast_decode=True)


@pytest.mark.parametrize(
    ("size", "factor", "scale"),
    [
        ((840, 500), 2, 2),
        ((840, 500), 3, 2),
        ((555, 416), 4, 4),
        ((640, 480), 8, 8),
        ((17, 16), 8, 8),
    ],
)
def test_draft_scale_is_pils_choice(size: tuple[int, int], factor: int, scale: int) -> None:
    assert jpeg.draft_scale(*size, factor) == scale
    img = Image.new("RGB", size)
    img = Image.open(io.BytesIO(encoded(img)))
    img.draft("RGB", (size[0] // factor, size[1] // factor))
    assert img.size == (-(-size[0] // scale), -(-size[1] // scale))
