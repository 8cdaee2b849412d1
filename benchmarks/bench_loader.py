"""Training loader throughput per core: kiln's WebDatasetLoader vs a plain webdataset + PIL
pipeline, on real photos, at the model's input size.

Datasets (written once under runs/bench/loader/ with kiln's own shard writer, as `kiln
curate` lays them out: `{uid}.jpg/.txt/.json`, sorted by uid):

- ``web``: the 32 web photos (~512-840 px JPEGs, img2dataset-style) of the real WebDataset
  shard in ../shared/data/cc12m_wds_shard, each repeated 16 times with distinct uids and
  captions (512 samples);
- ``flickr8k``: the 1,000 Flickr8k photos (mostly 200x150, some 500x375) with their 5
  human captions each, one sample per caption (5,000 samples, image bytes repeated per
  caption as curation writes them).

Pipelines, each producing normalized ``float32 [B, 3, S, S]`` images (random resized crop
60-100% area, aspect 3/4-4/3, bicubic, horizontal flip, CLIP mean/std) plus tokenized
captions, batch 32, shuffle buffer 256:

- ``baseline``: ``webdataset.WebDataset(...).shuffle(256).decode("pil").to_tuple("jpg",
  "txt")`` then what torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip`` +
  ``ToTensor`` + ``Normalize`` do on a PIL image (written out with PIL and torch: kiln's
  venv has no torchvision), batched with ``torch.stack``;
- ``kiln``: `WebDatasetLoader` with ``fast_decode=True`` (`data.fast_decode: true`);
- ``kiln_full_decode``: `WebDatasetLoader` with ``fast_decode=False`` (full-size decode and
  PIL resize: the pixels of runs started before the setting existed).

Per core: each pipeline runs in this process (no DataLoader workers, torch on 1 thread) and
is timed by CPU time (`time.process_time`), so other load on the machine barely moves the
figure; rounds alternate between the pipelines and the best round counts. Also: wall-clock
samples/s with one DataLoader worker process (what a rank with ``data.num_workers: 1``
gets), which does depend on how busy the machine is.

Goal (issue 8): kiln >= 2x the baseline per core at the model's input size: 32 (the tiny
flavor) and 224 (ViT-S/32, B/16). Also reports, for flickr8k, how often a worker would meet
an image it decoded in its last 256/1024 samples (what a per-worker decode cache keyed by
the image bytes could save). Prints JSON. Run: python benchmarks/bench_loader.py
[--sizes 32 224] [--samples 320] [--rounds 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tarfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from kiln.contracts import make_uid, read_manifest
from kiln.data_curation.shard import write_shards
from kiln.models.preprocess import normalize_pixels
from kiln.models.tokenizer import tokenize
from kiln.training.data import WebDatasetLoader
from kiln.training.transforms import IMAGE_MEAN, IMAGE_STD

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
WORK = REPO / "runs" / "bench" / "loader"
BATCH = 32
BUFFER = 256
CONTEXT = 48


# ------------------------------------------------------------------ datasets


def _write(name: str, rows: list[dict[str, Any]]) -> str:
    out = WORK / name
    if (out / "manifest.json").is_file() and read_manifest(str(out)).num_samples == len(rows):
        return str(out)
    rows.sort(key=lambda r: r["uid"])
    write_shards([pa.Table.from_pylist(rows)], str(out), samples_per_shard=1000, name=name)
    return str(out)


def web_dataset() -> str:
    """The real web shard's photos, 16 samples each (distinct uids and captions)."""
    shard = DATA / "cc12m_wds_shard" / "cc12m-train-0000.tar"
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for m in tar:
            if m.isfile():
                key, _, ext = m.name.partition(".")
                data = tar.extractfile(m)
                assert data is not None
                members.setdefault(key, {})[ext] = data.read()
    rows = []
    for key, sample in sorted(members.items()):
        for copy in range(16):
            text = f"{sample['txt'].decode('utf-8', 'replace')} ({copy})"
            url = f"web/{key}/{copy}"
            rows.append({"uid": make_uid(url, text), "text": text, "image": sample["jpg"]})
    return _write("web", rows)


def flickr_dataset() -> tuple[str, dict[str, str]]:
    """Flickr8k: one sample per caption; returns (dataset, uid -> image file name)."""
    folder = DATA / "flickr8k_1k"
    images: dict[str, bytes] = {}
    rows, image_of = [], {}
    with open(folder / "captions.csv", newline="") as f:
        for row in csv.DictReader(f):
            name = row["image"]
            if name not in images:
                images[name] = (folder / "images" / name).read_bytes()
            uid = make_uid(name, row["caption"])
            image_of[uid] = name
            rows.append({"uid": uid, "text": row["caption"], "image": images[name]})
    return _write("flickr8k", rows), image_of


# ------------------------------------------------------------------ the plain pipeline


def _resized_crop_params(img: Image.Image, rnd: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params(scale=(0.6, 1), ratio=(3/4, 4/3))."""
    width, height = img.size
    area = width * height
    log_ratio = (np.log(3 / 4), np.log(4 / 3))
    for _ in range(10):
        target = area * rnd.uniform(0.6, 1.0)
        aspect = float(np.exp(rnd.uniform(*log_ratio)))
        w = round((target * aspect) ** 0.5)
        h = round((target / aspect) ** 0.5)
        if 0 < w <= width and 0 < h <= height:
            return rnd.randint(0, height - h), rnd.randint(0, width - w), h, w
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


def baseline_batches(dataset: str, size: int, seed: int) -> Iterator[tuple[torch.Tensor, Any]]:
    """webdataset + PIL, as a training script without kiln would write it."""
    import webdataset as wds

    manifest = read_manifest(dataset)
    urls = [manifest.shard_url(dataset, s) for s in manifest.shards]
    rnd = random.Random(seed)
    mean = torch.tensor(IMAGE_MEAN).reshape(3, 1, 1)
    std = torch.tensor(IMAGE_STD).reshape(3, 1, 1)

    def transform(img: Image.Image) -> torch.Tensor:
        top, left, h, w = _resized_crop_params(img, rnd)  # RandomResizedCrop
        img = img.crop((left, top, left + w, top + h)).resize(
            (size, size), Image.Resampling.BICUBIC
        )
        if rnd.random() < 0.5:  # RandomHorizontalFlip
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(img, np.uint8, copy=True))  # ToTensor
        tensor = pixels.permute(2, 0, 1).contiguous().float().div(255)
        return tensor.sub(mean).div(std)  # Normalize (not in place)

    while True:
        pipeline = (
            wds.WebDataset(urls, shardshuffle=False, empty_check=False)
            .shuffle(BUFFER, rng=random.Random(rnd.random()))
            .decode("pil")
            .to_tuple("jpg", "txt")
        )
        images: list[torch.Tensor] = []
        texts: list[str] = []
        for img, text in pipeline:
            images.append(transform(img))
            texts.append(text)
            if len(images) == BATCH:
                yield torch.stack(images), tokenize(texts, CONTEXT)
                images, texts = [], []


def kiln_batches(dataset: str, size: int, seed: int, fast: bool, workers: int = 0) -> Iterator[Any]:
    loader = WebDatasetLoader(
        dataset,
        batch_size=BATCH,
        seed=seed,
        num_workers=workers,
        shuffle_buffer=BUFFER,
        augment=True,
        fast_decode=fast,
        image_size=size,
        context_length=CONTEXT,
    )
    for batch in loader:  # normalized as its rank does on the CPU (`Batch.to`)
        yield normalize_pixels(batch.images), batch.tokens


class _Workers(torch.utils.data.IterableDataset):
    """The baseline in one DataLoader worker process, for the wall-clock figure."""

    def __init__(self, dataset: str, size: int) -> None:
        self.dataset, self.size = dataset, size

    def __iter__(self) -> Iterator[Any]:
        return baseline_batches(self.dataset, self.size, 0)


def _baseline_in_worker(dataset: str, size: int) -> Iterator[Any]:
    dl = torch.utils.data.DataLoader(
        _Workers(dataset, size), batch_size=None, num_workers=1, prefetch_factor=2
    )
    return iter(dl)


# ------------------------------------------------------------------ timing


def _time(make: Callable[[], Iterator[Any]], samples: int, clock: Callable[[], float]) -> float:
    """Samples per second of `clock` over `samples` samples (after one warm-up batch)."""
    batches = make()
    try:
        images, _ = next(batches)
        assert images.dtype == torch.float32 and images.shape[1] == 3
        start, done = clock(), 0
        while done < samples:
            images, _ = next(batches)
            done += images.shape[0]
        return done / (clock() - start)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def cache_hit_rate(dataset: str, image_of: dict[str, str], sizes: tuple[int, ...]) -> dict:
    """Share of samples whose image (bytes) was among the last K images the worker decoded,
    over one epoch of the kiln loader's order (K = 256, 1024)."""
    loader = WebDatasetLoader(
        dataset, batch_size=BATCH, seed=0, shuffle_buffer=BUFFER, image_size=min(sizes)
    )
    order: list[str] = []
    stream = iter(loader)
    try:
        for _ in range(loader.steps_per_epoch):
            order += [image_of[u] for u in next(stream).uids]
    finally:
        stream.close()  # type: ignore[attr-defined]
    out = {}
    for k in (256, 1024):
        lru: OrderedDict[str, None] = OrderedDict()
        hits = 0
        for name in order:
            if name in lru:
                hits += 1
                lru.move_to_end(name)
            else:
                lru[name] = None
                if len(lru) > k:
                    lru.popitem(last=False)
        out[f"last_{k}_images"] = round(hits / len(order), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--samples", type=int, default=320, help="timed samples per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--datasets", nargs="+", default=["web", "flickr8k"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    flickr, image_of = flickr_dataset()
    paths = {"web": web_dataset(), "flickr8k": flickr}
    results: list[dict[str, Any]] = []
    for name in args.datasets:
        dataset = paths[name]
        for size in args.sizes:
            pipes: dict[str, Callable[[], Iterator[Any]]] = {
                "baseline": partial(baseline_batches, dataset, size, 0),
                "kiln": partial(kiln_batches, dataset, size, 0, True),
                "kiln_full_decode": partial(kiln_batches, dataset, size, 0, False),
            }
            cpu: dict[str, float] = dict.fromkeys(pipes, 0.0)
            for _ in range(args.rounds):
                for pipe, make in pipes.items():
                    cpu[pipe] = max(cpu[pipe], _time(make, args.samples, time.process_time))
            in_worker = {
                "baseline": partial(_baseline_in_worker, dataset, size),
                "kiln": partial(kiln_batches, dataset, size, 0, True, 1),
            }
            wall = {
                k: _time(make, args.samples, time.perf_counter) for k, make in in_worker.items()
            }
            results.append(
                {
                    "dataset": name,
                    "image_size": size,
                    "samples_per_cpu_s": {k: round(v, 1) for k, v in cpu.items()},
                    "kiln_over_baseline_per_core": round(cpu["kiln"] / cpu["baseline"], 2),
                    "kiln_full_decode_over_baseline_per_core": round(
                        cpu["kiln_full_decode"] / cpu["baseline"], 2
                    ),
                    "wall_samples_per_s_1_worker": {k: round(v, 1) for k, v in wall.items()},
                }
            )
            print(json.dumps(results[-1]), flush=True)
    report = {
        "benchmark": "loader",
        "batch": BATCH,
        "goal": "kiln >= 2x baseline samples per CPU-second at the model's input size",
        "results": results,
        "flickr8k_repeat_image_rate": cache_hit_rate(flickr, image_of, tuple(args.sizes)),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
