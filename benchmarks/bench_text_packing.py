"""Training step on real web alt-texts: the text tower's packing against no packing.

kiln's text towers run their per-token layers on each caption's own tokens
(`kiln.models.layers.Packing`: the batch's padding is dropped, and only attention runs on
the batch padded to its longest caption; CoCa's decoder and vocabulary head too). This
measures what that saves on the captions kiln's loader really feeds them: the 10,000 web
alt-texts of ``../shared/data/laion_alttext`` (in file order, cycled), tokenized by kiln's
byte tokenizer at the flavor's context length. Flavors with captions: CLIP, SigLIP, CoCa.

What is timed: the forward, the loss of the flavor's objective, backward and kiln's AdamW step, on
random images and ``--batches`` different batches of real captions, one process, CPU fp32,
``--threads`` torch threads, by process CPU time. The same model and batches run both ways,
packed and never packed (`kiln.models.text.PACK_MIN_PADDING` above 1), in alternating
rounds; the best round of each counts. The flavor's text tower takes byte ids
(``model.text.tokenizer=byte``, as `kiln train` feeds it). Also reported: how much of each
batch is padding once cut at its longest caption, which is what packing removes.

Prints JSON. Run: python benchmarks/bench_text_packing.py [--flavor clip-vit-s-32]
[--batch 32] [--batches 4] [--rounds 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from pydantic import TypeAdapter

import kiln.models.text as text_module
from kiln.models.build import build_model
from kiln.models.config import ModelConfig
from kiln.models.tokenizer import PAD_ID, VOCAB_SIZE, tokenize
from kiln.training.config import OptimConfig
from kiln.training.engine import adamw_args
from kiln.training.objectives import build_objective
from kiln.training.objectives.config import ObjectiveConfig
from kiln.training.optim import AdamW

ALT_TEXTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "laion_alttext"


def _captions(count: int) -> list[str]:
    path = ALT_TEXTS / "test_10000.parquet"
    if not path.is_file():
        raise SystemExit(f"this benchmark reads {path} (the shared data folder beside the repo)")
    texts = [t or "" for t in pq.read_table(path, columns=["TEXT"]).column("TEXT").to_pylist()]
    return [texts[i % len(texts)] for i in range(count)]


def _padding(tokens: torch.Tensor) -> float:
    """Share of the positions up to the batch's longest caption that are padding."""
    lengths = (tokens != PAD_ID).sum(dim=1)
    return 1 - float(lengths.sum()) / (len(lengths) * int(lengths.max()))


def _round(
    model: Any, objective: Any, opt: Any, images: torch.Tensor, batches: list[torch.Tensor]
) -> float:
    cpu = time.process_time()
    for tokens in batches:
        opt.zero_grad(set_to_none=True)
        batch = {"images": images, "tokens": tokens}
        outputs = model(**objective.model_inputs(batch))
        objective.loss(outputs, batch)[0].backward()
        opt.step()
    return time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flavor", default="clip-vit-s-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(
        {"flavor": args.flavor, "text": {"tokenizer": "byte", "vocab_size": VOCAB_SIZE}}
    )
    if cfg.text is None:
        raise SystemExit(
            f"flavor {args.flavor!r} has no text tower: pick a clip, siglip or coca one"
        )
    model = build_model(cfg).train()
    objective = build_objective(TypeAdapter(ObjectiveConfig).validate_python({"name": cfg.arch}))
    ctx = cfg.text.context_length
    captions = _captions(args.batch * args.batches)
    batches = [
        tokenize(captions[i : i + args.batch], ctx) for i in range(0, len(captions), args.batch)
    ]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    opt = AdamW(model.parameters(), **adamw_args(OptimConfig()))

    default = text_module.PACK_MIN_PADDING
    best = {"packed": float("inf"), "unpacked": float("inf")}
    # warm-up: allocator, kernels, optimizer state
    _round(model, objective, opt, images, batches[:1])
    for _ in range(args.rounds):
        for mode, threshold in (("packed", default), ("unpacked", 2.0)):
            text_module.PACK_MIN_PADDING = threshold
            try:
                best[mode] = min(best[mode], _round(model, objective, opt, images, batches))
            finally:
                text_module.PACK_MIN_PADDING = default
    samples = args.batch * args.batches
    rate = {mode: samples / cpu for mode, cpu in best.items()}
    lengths = [int((t != PAD_ID).sum(dim=1).max()) for t in batches]
    print(
        json.dumps(
            {
                "benchmark": "text_packing",
                "flavor": args.flavor,
                "objective": cfg.arch,
                "batch": args.batch,
                "batches": args.batches,
                "threads": args.threads,
                "context_length": ctx,
                "longest_caption_per_batch": lengths,
                "mean_caption": round(
                    sum(float((t != PAD_ID).sum()) for t in batches) / samples, 1
                ),
                "padding_share": [round(_padding(t), 3) for t in batches],
                "samples_per_cpu_s": {k: round(v, 2) for k, v in rate.items()},
                "packed_over_unpacked": round(rate["packed"] / rate["unpacked"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
