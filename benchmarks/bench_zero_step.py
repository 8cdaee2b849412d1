"""DeepSpeed ZeRO's cost per training step, by phase, against a plain loop; CPU, one rank.

Why: `bench_train_overhead` finds `kiln train` on `clip-tiny` at batch 32 a fixed few
milliseconds a step slower than the pure model step, which is 15-20% of that 25-30 ms
step and nothing on a real model's. This benchmark says where those milliseconds are.

In one process (one torch thread, kiln's allocator setting, a gloo group of one on
loopback), on the same batches already in memory (read once by kiln's loader from
`bench_train_overhead`'s dataset for the flavor): the plain loop (kiln's model, CLIP loss,
``backward``, the recipe's gradient clipping, kiln's AdamW: `bench_train_overhead`'s pure
step) and kiln's DeepSpeed engine (`kiln.training.engine.build_engine`, ZeRO ``--stage``,
what `kiln train` steps), alternating ``--rounds`` times, ``--steps`` timed steps each
after a warm-up. Each step is timed in three phases: forward + loss, backward (for the
engine ``engine.backward``: torch's backward plus DeepSpeed's gradient hooks and epilogue),
optimizer step (clipping included). Medians per phase and per round are reported.

Inside the engine's rounds, DeepSpeed's own gradient-handling functions are also timed
(`_DEEPSPEED_FUNCTIONS`, wrapped with a timer on the class for those rounds and unwrapped
after): milliseconds per timed step in each. A wrapped function adds about a microsecond a
call, which is included. Prints JSON.
Run: python benchmarks/bench_zero_step.py [--flavor clip-tiny] [--batch 32] [--stage 2]
[--steps 60] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
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
    pure_step,
)

#: (module, class or None for a module function, name): DeepSpeed's per-step gradient work
_DEEPSPEED_FUNCTIONS = [
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "process_gradients"),
    ("deepspeed.runtime.zero.stage_1_and_2", None, "count_used_parameters_in_backward"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "reduce_ipg_grads"),
    ("deepspeed.runtime.engine", "DeepSpeedEngine", "_backward_epilogue"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "scaled_global_norm"),
    (
        "deepspeed.runtime.zero.stage_1_and_2",
        "DeepSpeedZeroOptimizer",
        "_update_model_bit16_weights",
    ),
]

Phases = tuple[float, float, float]  # forward + loss, backward, optimizer step (seconds)


@contextlib.contextmanager
def _timed_functions(totals: dict[str, float]) -> Iterator[None]:
    """Each `_DEEPSPEED_FUNCTIONS` entry wrapped to add its wall time to `totals`."""
    import importlib

    saved = []
    for module_name, owner_name, name in _DEEPSPEED_FUNCTIONS:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
        original = getattr(owner, name, None)
        if original is None:  # another DeepSpeed version: not timed, and said so
            totals[f"{name} (absent)"] += 0.0
            continue

        def timed(*args: Any, _f: Callable[..., Any] = original, _n: str = name, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return _f(*args, **kw)
            finally:
                totals[_n] += time.perf_counter() - start

        saved.append((owner, name, original))
        setattr(owner, name, timed)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _plain(cfg: Any) -> Callable[[Any], Phases]:
    import torch

    from kiln.models.build import build_model
    from kiln.training.engine import adamw_args
    from kiln.training.optim import AdamW

    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    opt = AdamW(model.parameters(), **adamw_args(cfg.optim))
    return lambda b: pure_step(model, opt, cfg.optim, b)


def _engine(cfg: Any) -> Callable[[Any], Phases]:
    import torch

    from kiln.models.build import build_model
    from kiln.training.engine import build_engine
    from kiln.training.objectives.clip import clip_loss

    torch.manual_seed(0)
    engine = build_engine(build_model(cfg.model), cfg, 1)

    def step(b: Any) -> Phases:
        t0 = time.perf_counter()
        out = engine(b.images, b.tokens)
        loss = clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    return step


def _time(
    step: Callable[[Any], Phases],
    batches: list[Any],
    steps: int,
    during: contextlib.AbstractContextManager[None] | None = None,
) -> list[Phases]:
    """Each timed step's phases, after the warm-up; `during` is entered for the timed
    steps only."""
    for i in range(WARMUP_STEPS):
        step(batches[i])
    with during or contextlib.nullcontext():
        return [step(batches[i]) for i in range(WARMUP_STEPS, WARMUP_STEPS + steps)]


def _medians_ms(phases: list[Phases]) -> dict[str, float]:
    names = ("forward_ms", "backward_ms", "optimizer_step_ms")
    out = {n: round(1e3 * statistics.median(p[i] for p in phases), 2) for i, n in enumerate(names)}
    out["step_ms"] = round(1e3 * statistics.median(sum(p) for p in phases), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flavor", default=TINY, help="the model (`kiln model list`)")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--stage", type=int, default=2, choices=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=2, help="plain and engine alternations")
    args = ap.parse_args()

    import torch

    from kiln.training.data import WebDatasetLoader
    from kiln.training.engine import init_distributed
    from kiln.training.host_memory import keep_freed_memory
    from kiln.training.launch import free_port

    keep_freed_memory()  # what a `kiln train` rank does (`host_memory: reuse`)
    torch.set_num_threads(1)
    port = str(free_port())
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    init_distributed()
    data = dataset(args.flavor)
    total = WARMUP_STEPS + args.steps
    cfg = _config(data, total, args.flavor, args.batch, stage=args.stage)
    loader = WebDatasetLoader.from_config(cfg)
    batches = in_memory(iter(loader), total)

    rounds = []
    for r in range(args.rounds):
        plain = _medians_ms(_time(_plain(cfg), batches, args.steps))
        totals: dict[str, float] = defaultdict(float)
        engine = _medians_ms(_time(_engine(cfg), batches, args.steps, _timed_functions(totals)))
        per_step = {k: round(1e3 * v / args.steps, 3) for k, v in totals.items()}
        rounds.append({"round": r, "plain": plain, "engine": engine, "deepspeed_ms": per_step})
        print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "benchmark": "zero_step",
                "flavor": args.flavor,
                "batch": args.batch,
                "zero_stage": args.stage,
                "steps_per_round": args.steps,
                "rounds": rounds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
