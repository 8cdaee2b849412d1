"""Activation checkpointing: peak memory of one training step of CLIP ViT-B/16, with and
without `model.activation_checkpointing`, batch 8, CPU fp32.

Each setting runs in a fresh process (peak RSS is per process): build `clip-vit-b-16` (byte
tokenizer: kiln ships no BPE; 259-row embedding), note the RSS (weights), run one forward +
CLIP loss + backward on random images and tokens, note the peak RSS. What the step adds
over the weights is activations + gradients; checkpointing shrinks the activations part,
measured directly as the bytes autograd keeps for the backward pass (saved-tensor hooks).
Also checks the gradients are the same (max abs difference). Prints JSON.
Run: python benchmarks/bench_activation_memory.py [--batch 8] [--flavor clip-vit-b-16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any


def one(flavor: str, batch: int, on: bool) -> dict[str, Any]:
    import resource

    import torch

    from kiln.models.build import build_model
    from kiln.models.config import ModelConfig
    from kiln.training.objectives.clip import clip_loss

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(
        {
            "flavor": flavor,
            "text": {"tokenizer": "byte", "vocab_size": 259},
            "activation_checkpointing": on,
        }
    )
    model = build_model(cfg)
    weights = rss_mb()
    g = torch.Generator().manual_seed(1)
    size = cfg.vision.image_size
    images = torch.rand(batch, 3, size, size, generator=g)
    assert cfg.text is not None
    tokens = torch.randint(3, 259, (batch, cfg.text.context_length), generator=g)
    saved: dict[int, int] = {}  # storage -> bytes: what autograd keeps for the backward

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(images, tokens)
        loss = clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
    saved_mb = sum(saved.values()) / 2**20
    loss.backward()
    seconds = time.perf_counter() - start
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.save(grad, f"/tmp/kiln-actmem-grad-{int(on)}.pt")
    return {
        "activation_checkpointing": on,
        "weights_rss_mb": round(weights),
        "peak_rss_mb": round(rss_mb()),
        "step_added_mb": round(rss_mb() - weights),
        "saved_for_backward_mb": round(saved_mb),
        "step_s": round(seconds, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flavor", default="clip-vit-b-16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--one", choices=["0", "1"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.flavor, args.batch, args.one == "1")))
        return
    runs = []
    for on in ("0", "1"):
        cmd = [sys.executable, __file__, "--one", on, "--flavor", args.flavor]
        cmd += ["--batch", str(args.batch)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    import torch

    a, b = (torch.load(f"/tmp/kiln-actmem-grad-{i}.pt") for i in (0, 1))
    plain, ckpt = runs
    print(
        json.dumps(
            {
                "benchmark": "activation_memory",
                "flavor": args.flavor,
                "batch": args.batch,
                "runs": runs,
                "saved_for_backward_ratio": round(
                    ckpt["saved_for_backward_mb"] / plain["saved_for_backward_mb"], 3
                ),
                "step_memory_ratio": round(ckpt["step_added_mb"] / plain["step_added_mb"], 3),
                "peak_rss_ratio": round(ckpt["peak_rss_mb"] / plain["peak_rss_mb"], 3),
                "step_time_ratio": round(ckpt["step_s"] / plain["step_s"], 3),
                "max_abs_grad_difference": float((a - b).abs().max()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
