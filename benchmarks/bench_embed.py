"""Embed stage throughput: images/s per core for the quickstart model and a ViT-B/16 CLIP.

What is timed is the embed stage's own per-actor work, `ModelEncoder.images` (what
`EmbedStage.apply` calls on each batch): decode the JPEG bytes, `kiln eval`'s preprocessing
(RGB, shorter side to the model's size, centre crop, CLIP normalization), the image tower
in batches of `--batch`, L2 normalization. Inputs are real photos: the first `--images`
JPEGs of Flickr8k in `../shared/data/flickr8k_1k` (500x375-ish, as web images are), read
into memory first. Weights are a seeded random init of each flavor: throughput does not
depend on trained values. One torch thread (`--threads`), timed by this process's CPU time,
so the figure is per core and other load on the machine barely moves it; the best of
`--rounds` counts. Both precisions are reported: `exact: true` (float64, the stage's
default: an embedding does not depend on its batch) and `exact: false` (float32). The share
spent decoding + preprocessing is reported apart (`preprocess_share`), since it is the part
more cores per actor cannot shorten for the model.

Models: `clip-tiny` (the quickstart's flavor, 32 px) and `clip-vit-b-16` (224 px,
149.6M parameters). Prints JSON.
Run: python benchmarks/bench_embed.py [--models clip-tiny clip-vit-b-16] [--images 64]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from kiln.data_curation.stages.embed import ModelEncoder
from kiln.models.build import build_model
from kiln.models.config import ModelConfig
from kiln.models.trained import Model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k_1k" / "images"


def _photos(n: int) -> list[bytes]:
    files = sorted(DATA.glob("*.jpg"))[:n]
    if len(files) < n:
        raise SystemExit(
            f"bench_embed: needs {n} JPEGs in {DATA} (../shared/data), found {len(files)}"
        )
    return [f.read_bytes() for f in files]


def _encoder(flavor: str, exact: bool) -> ModelEncoder:
    cfg = ModelConfig.model_validate({"flavor": flavor})
    torch.manual_seed(0)
    model = Model(build_model(cfg), cfg, step=0)
    dtype = torch.float64 if exact else torch.float32
    model.module.to(dtype=dtype)
    dim = int(
        model.encode_image(torch.zeros(1, 3, cfg.image_size, cfg.image_size, dtype=dtype)).shape[-1]
    )
    return ModelEncoder(
        model=model, sha256=hashlib.sha256(flavor.encode()).hexdigest(), dim=dim, dtype=dtype
    )


def _cpu() -> float:
    return time.process_time()


def measure(
    flavor: str, exact: bool, blobs: list[bytes], batch: int, rounds: int
) -> dict[str, Any]:
    enc = _encoder(flavor, exact)
    enc.images(blobs[:batch], batch)  # warm-up: first-call allocations
    best_total = best_pre = float("inf")
    for _ in range(rounds):
        t0 = _cpu()
        tensors = [enc.model.preprocess(b) for b in blobs]
        t1 = _cpu()
        x, ok = enc.images(blobs, batch)
        t2 = _cpu()
        assert ok.all() and x.shape == (len(blobs), enc.dim)
        best_pre = min(best_pre, t1 - t0)
        best_total = min(best_total, t2 - t1)
        del tensors
    params = sum(p.numel() for p in enc.model.module.parameters())
    return {
        "flavor": flavor,
        "exact": exact,
        "parameters": params,
        "image_size": enc.model.cfg.image_size,
        "images": len(blobs),
        "images_per_s_per_core": round(len(blobs) / best_total, 2),
        "preprocess_share": round(best_pre / best_total, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["clip-tiny", "clip-vit-b-16"])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="the stage's default batch_size")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    blobs = _photos(args.images)
    results = [
        measure(flavor, exact, blobs, args.batch, args.rounds)
        for flavor in args.models
        for exact in (True, False)
    ]
    print(json.dumps({"threads": args.threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()
