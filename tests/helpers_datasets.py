"""Tiny generated datasets in kiln's shard layout, for training tests.

`write_tiny_dataset` writes `{root}/manifest.json` plus `shards/{index:06d}.tar`, each sample
`{uid}.jpg`, `{uid}.txt`, `{uid}.json`: the layout `kiln curate` produces. Images are small
coloured patterns whose colour matches a word in the caption, so a tiny CLIP can learn
something; everything is a pure function of the arguments (byte-reproducible).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kiln import storage
from kiln.contracts import DatasetManifest, ShardInfo, make_uid, sha256_hex, write_manifest
from kiln.data_curation.synthetic import COLORS as SYNTHETIC_COLORS

__all__ = ["COLORS", "curate_matched_dataset", "curate_recipe", "write_tiny_dataset"]

# the demo pool's palette, so test images look like the data kiln really trains on
COLORS = SYNTHETIC_COLORS
SHAPES = ("square", "stripe", "dot", "field")


def _image(rng: np.random.Generator, color: tuple[int, int, int], shape: str, size: int) -> bytes:
    bg = rng.integers(0, 256, 3)
    arr = np.empty((size, size, 3), dtype=np.uint8)
    arr[:] = bg
    c = np.asarray(color, dtype=np.uint8)
    lo, hi = size // 4, 3 * size // 4
    if shape == "square":
        arr[lo:hi, lo:hi] = c
    elif shape == "stripe":
        arr[:, lo:hi] = c
    elif shape == "dot":
        yy, xx = np.mgrid[:size, :size]
        arr[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2] = c
    else:
        arr[:] = c
    noise = rng.integers(-12, 13, arr.shape)
    arr = np.clip(arr.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tiny_dataset(
    root: Path,
    *,
    num_samples: int = 64,
    shard_sizes: Sequence[int] | None = None,
    image_size: int = 20,
    seed: int = 0,
    with_text: bool = True,
) -> Path:
    """Write a dataset of `num_samples` samples to `root`; returns `root`.

    `shard_sizes` defaults to shards of 13 samples (so shard boundaries do not align with
    batch boundaries, which exercises partial-shard reads). ``with_text=False`` writes
    image-only samples (no ``{uid}.txt``), as an unlabelled image collection would be.
    """
    if shard_sizes is None:
        shard_sizes = [13] * (num_samples // 13) + ([num_samples % 13] if num_samples % 13 else [])
    if sum(shard_sizes) != num_samples:
        raise ValueError(f"shard_sizes {list(shard_sizes)} do not sum to {num_samples}")
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    shards, i = [], 0
    for index, count in enumerate(shard_sizes):
        rel = f"shards/{index:06d}.tar"
        members: list[tuple[str, bytes]] = []
        for _ in range(count):
            color = names[int(rng.integers(len(names)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            text = f"a {color} {shape} number {i}"
            url = f"http://example.com/{i}.jpg"
            uid = make_uid(url, text)
            meta = {"url": url, "width": image_size, "height": image_size}
            members.append((f"{uid}.jpg", _image(rng, COLORS[color], shape, image_size)))
            if with_text:
                members.append((f"{uid}.txt", text.encode()))
            members.append((f"{uid}.json", json.dumps(meta, sort_keys=True).encode()))
            i += 1
        data = storage.tar_bytes(members)
        (root / rel).write_bytes(data)
        shards.append(
            ShardInfo(path=rel, num_samples=count, bytes=len(data), sha256=sha256_hex(data))
        )
    manifest = DatasetManifest(name="tiny", num_samples=num_samples, shards=shards)
    write_manifest(str(root), manifest)
    return root


def curate_matched_dataset(
    root: Path, *, num_samples: int = 400, t: int | None = None, samples_per_shard: int = 50
) -> Path:
    """Curate a synthetic pool of `num_samples` rows (16-px images, long-tailed entry use)
    with `kiln curate`'s own runner (local executor) into `root/run`; returns the dataset
    folder. `t=None` writes the matched set (metaclip_balance t: null), else a set balanced
    offline at `t`; either way with the online-balancing sidecars."""
    from kiln.data_curation import run_curation
    from kiln.data_curation.config import CurationConfig

    pool = root / "pool"
    cfg = CurationConfig.model_validate(
        {
            "input": {
                "format": "synthetic",
                "paths": [str(pool)],
                "synthetic": {
                    "num_samples": num_samples,
                    "num_eval": 0,
                    "image_size": 16,
                    "rows_per_file": 200,
                },
            },
            "stages": [
                {"stage": "text"},
                {"stage": "text_dedup"},
                {"stage": "metaclip_match", "entries": str(pool / "metadata.txt")},
                {"stage": "metaclip_balance", "t": t},
                {"stage": "image"},
            ],
            "execution": {"executor": "local", "workers": 1},
            "shard": {"samples_per_shard": samples_per_shard},
        }
    )
    return Path(run_curation(cfg, str(root / "run")).dataset_dir)


def curate_recipe(root: Path, *, num_samples: int = 240, executor: str = "local") -> dict[str, Any]:
    """A `kind: curate` recipe (as a dict) of the quickstart's plan on a small procedural
    pool under `root`: `kiln curate` turns it into a real curated dataset (16-px images,
    shards of 32 samples) at ``{root}/curate/dataset`` in a few seconds."""
    return {
        "kind": "curate",
        "name": "tiny-curate",
        "run_dir": str(root / "curate"),
        "input": {
            "format": "synthetic",
            "paths": [str(root / "pool")],
            "synthetic": {"num_samples": num_samples, "num_eval": 0, "image_size": 16},
        },
        "stages": [
            {"stage": "text", "min_chars": 3, "max_chars": 300},
            {"stage": "text_dedup"},
            {"stage": "metaclip_match", "entries": str(root / "pool" / "metadata.txt")},
            {"stage": "metaclip_balance", "t": 30, "seed": 0},
            {"stage": "image", "min_size": 8},
            {"stage": "image_dedup"},
        ],
        "shard": {"samples_per_shard": 32},
        "execution": {"executor": executor, "rows_per_task": 64},
    }
