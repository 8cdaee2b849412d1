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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_overhead import BATCH, SYNCS, TINY, dataset, pure_rate

MODES = ("independent", *SYNCS)


def rate(data: str, flavor: str, ranks: int, steps: int, mode: str) -> dict[str, float]:
    """Samples/s of `ranks` processes in `mode`, added up, and their CPU ms per sample
    (`bench_train_overhead.pure_rate`, with kiln's allocator setting)."""
    sync = None if mode == "independent" else mode
    got = pure_rate(data, ranks, steps, flavor, reuse=True, sync=sync)
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
