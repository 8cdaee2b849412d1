"""What synchronous data parallelism itself costs on CPU ranks, one sync point at a time.

Why: `bench_train_overhead` compares `kiln train` at N ranks with N *independent* pure-step
processes, which never wait for each other. Any synchronous trainer pays for waiting. This
benchmark adds the synchronisation of one data-parallel step to the pure step piece by
piece, so the cost of each piece is measured apart from kiln (no loader, no DeepSpeed):

- ``independent``: N processes, each the pure step (`bench_train_overhead.pure_step`'s: kiln's
  model, the CLIP loss over its own batch, backward, clipping, kiln's AdamW), no group;
- ``barrier``: the same, plus one ``barrier`` a step (the ranks wait for the slowest);
- ``global_loss``: the CLIP loss over the global batch (`clip_loss` with the ranks' group:
  an all-gather forward, an all-reduce backward; ``equal_batches`` as `kiln train` calls
  it), no gradient averaging;
- ``flat_all_reduce``: that, plus the gradients averaged by one all-reduce of them all,
  flattened, after the backward (the fewest collectives a data-parallel step can have);
- ``ddp``: torch's `DistributedDataParallel` (bucketed all-reduce during the backward) with
  the global loss: what `bench_train_overhead`'s ``pure_step_ddp`` runs.

Each process: one torch thread, kiln's allocator setting, gloo on 127.0.0.1, the same
batches in memory (`bench_train_overhead.in_memory`, a new batch every step). Samples/s add
up over the ranks; CPU milliseconds per sample are the processes' own. ``independent`` is
timed first and last, and every mode's ratio is against the mean of the two (this host's
speed drifts over minutes). Prints JSON.
Run: python benchmarks/bench_sync_cost.py [--ranks 2] [--steps 300] [--flavor clip-tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_overhead import (
    BATCH,
    TINY,
    WARMUP_STEPS,
    _config,
    dataset,
    in_memory,
    spawn_rates,
)

MODES = ("independent", "barrier", "global_loss", "flat_all_reduce", "ddp")


def _rank(
    data: str, flavor: str, steps: int, mode: str, rank: int, world: int, port: int, out: Any,
    start: Any,
) -> None:  # fmt: skip
    import torch
    import torch.distributed as dist

    from kiln.models.build import build_model
    from kiln.training.data import WebDatasetLoader
    from kiln.training.engine import adamw_args
    from kiln.training.host_memory import keep_freed_memory
    from kiln.training.objectives.clip import clip_loss
    from kiln.training.optim import AdamW

    keep_freed_memory()
    torch.set_num_threads(1)
    grouped = mode != "independent"
    if grouped:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = _config(data, steps, flavor)
    torch.manual_seed(0)
    model: torch.nn.Module = build_model(cfg.model).train()
    params = list(model.parameters())
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    opt = AdamW(params, **adamw_args(cfg.optim))
    loader = WebDatasetLoader(
        data, batch_size=BATCH, seed=0, image_size=cfg.model.image_size,
        context_length=cfg.model.context_length, fast_decode=cfg.data.fast_decode,
        rank=rank, world_size=world,
    )  # fmt: skip
    batches = in_memory(iter(loader), WARMUP_STEPS + steps)
    # `barrier`'s loss is over the rank's own batch: a group of one (new_group is collective,
    # so every rank makes every group); without a process group the loss is local anyway
    loss_group = [dist.new_group([r]) for r in range(world)][rank] if mode == "barrier" else None

    def step(i: int) -> None:
        batch = batches[i]
        opt.zero_grad(set_to_none=True)
        o = model(batch.images, batch.tokens)
        args = (o["image_embeds"], o["text_embeds"], o["logit_scale"])
        loss = clip_loss(*args, loss_group, equal_batches=True)
        loss.backward()
        if mode == "flat_all_reduce":
            grads = [p.grad for p in params if p.grad is not None]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat /= world
            for g, avg in zip(
                grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True
            ):
                g.copy_(avg)
        elif mode == "barrier":
            dist.barrier()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()

    for i in range(WARMUP_STEPS):
        step(i)
    start.wait()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(WARMUP_STEPS, WARMUP_STEPS + steps):
        step(i)
    out.put((steps * BATCH / (time.perf_counter() - wall), time.process_time() - cpu))
    if grouped:
        dist.destroy_process_group()


def rate(data: str, flavor: str, ranks: int, steps: int, mode: str) -> dict[str, float]:
    """Samples/s of `ranks` processes in `mode`, added up, and their CPU ms per sample."""
    got = spawn_rates(
        ranks, steps * BATCH, lambda r, port: (_rank, (data, flavor, steps, mode, r, ranks, port))
    )
    return {k: round(v, 3) for k, v in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--flavor", default=TINY, help="the model (`kiln model list`)")
    args = ap.parse_args()
    if args.ranks < 2:
        ap.error("--ranks must be at least 2: one rank has nothing to synchronise")
    data = dataset(args.flavor)
    results = {"independent_before": rate(data, args.flavor, args.ranks, args.steps, MODES[0])}
    for mode in MODES[1:]:
        print(f"[bench_sync_cost] {mode} ...", file=sys.stderr, flush=True)
        results[mode] = rate(data, args.flavor, args.ranks, args.steps, mode)
    results["independent_after"] = rate(data, args.flavor, args.ranks, args.steps, MODES[0])
    base = (
        results["independent_before"]["samples_per_s"]
        + results["independent_after"]["samples_per_s"]
    ) / 2
    for mode in MODES[1:]:
        results[mode]["over_independent"] = round(results[mode]["samples_per_s"] / base, 3)
    report = {
        "benchmark": "sync_cost",
        "flavor": args.flavor,
        "ranks": args.ranks,
        "batch_per_rank": BATCH,
        "steps": args.steps,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
