"""Where a GPU training step's time goes, in one process: kiln's DeepSpeed engine step
against the same engine with DeepSpeed's own overflow check, and against plain torch; then
what a batch's hand-over to the device costs the training thread.

- ``kiln``: `kiln.training.engine.build_engine` as `kiln train` builds it (the flavor, ZeRO-2,
  bf16, parameters aligned, gradient clipping, fused AdamW).
- ``deepspeed_overflow_scan``: the same engine with DeepSpeed's ZeRO 1-2 overflow check as
  DeepSpeed ships it, which scans every gradient for inf/NaN before testing the global norm
  for the same thing (kiln leaves it to the norm: `kiln.training.deepspeed_patches`).
- ``plain_torch``: the same model with bf16 weights, the same loss, ``clip_grad_norm_`` and
  torch's fused AdamW, no DeepSpeed: what the engine's overhead is measured against.

Each variant is built afresh, takes ``--warmup`` untimed steps, then ``--steps`` timed
(device-synchronized at both ends) on one synthetic batch made on the device; the engine
variants alternate ``--rounds`` times (a GPU step bound by the CPU launching its kernels
moves by a tenth between builds). Reported per variant: wall and CPU ms a step (every
round), DeepSpeed's per-gradient scans a step, and on CUDA the kernels, copies and memsets
a step (torch's profiler over 2 steps).

The hand-over: a batch of ``--batch-size`` images at the flavor's size moved to the device
and made the model's input, as `kiln.training.data.Batch.to` does: ``float32`` from pageable
memory (what a rank got before loaders handed over pixels) against ``uint8`` from pageable
and from page-locked memory (`Batch.pinned`, what a GPU rank gets), normalized on the
device. Reported: ms a batch, and how long the training thread was blocked.

Without CUDA the GPU part is skipped (a ``[kiln]`` line says so) and a CPU smoke
configuration runs (``clip-tiny``, bf16 so DeepSpeed's scan runs, batch 8, 2 + 3 steps, one
round) so the script stays tested. Prints one JSON line.

Run: python benchmarks/gpu_step.py [--flavor clip-vit-b-16] [--batch-size 256]
     [--warmup 5] [--steps 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_train import bench_config, synthetic_batch

SMOKE_FLAVOR, SMOKE_BATCH, SMOKE_WARMUP, SMOKE_STEPS = "clip-tiny", 8, 2, 3


def _log(msg: str) -> None:
    sys.stdout.write(f"[kiln] {msg}\n")
    sys.stdout.flush()


@contextlib.contextmanager
def overflow_check(stock: bool, scans: list[int]) -> Iterator[None]:
    """DeepSpeed's ZeRO 1-2 overflow check as shipped (`stock`) or kiln's, for the engines
    built inside; `scans` gets one entry per per-gradient scan DeepSpeed runs."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from kiln.training import deepspeed_patches

    cls: Any = DeepSpeedZeroOptimizer
    saved = cls.check_overflow, cls.has_overflow, deepspeed_patches._patch_redundant_overflow_scan
    scan = cls.has_overflow

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        scans.append(1)
        return scan(self, *args, **kwargs)

    cls.has_overflow = counted
    if stock:
        cls.check_overflow = saved[0]._kiln_original
        deepspeed_patches._patch_redundant_overflow_scan = lambda ds: None  # type: ignore[assignment]
    try:
        yield
    finally:
        cls.check_overflow, cls.has_overflow = saved[0], saved[1]
        deepspeed_patches._patch_redundant_overflow_scan = saved[2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], Any], device: torch.device, warmup: int, steps: int
) -> dict[str, float]:
    """Wall and CPU ms per step of `steps` calls of `step` after `warmup`."""
    for _ in range(warmup):
        step()
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    _sync(device)
    return {
        "ms": 1e3 * (time.perf_counter() - wall) / steps,
        "cpu_ms": 1e3 * (time.process_time() - cpu) / steps,
    }


def device_ops_per_step(step: Callable[[], Any], device: torch.device) -> float | None:
    """CUDA kernels, copies and memsets a step (torch's profiler over 2 steps); None on CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        step()
        _sync(device)
    events = prof.key_averages()
    return sum(e.count for e in events if e.device_type.name == "CUDA") / 2


def engine_variant(
    cfg: Any, device: torch.device, stock: bool, warmup: int, steps: int
) -> dict[str, Any]:
    """One build of kiln's engine (DeepSpeed's own overflow check with `stock`), timed."""
    from kiln.models.build import build_model
    from kiln.training.engine import build_engine, use_bf16
    from kiln.training.objectives import build_objective

    assert cfg.objective is not None
    objective = build_objective(cfg.objective)
    scans: list[int] = []
    with overflow_check(stock, scans):
        torch.manual_seed(cfg.seed)
        engine = build_engine(build_model(cfg.model), cfg, 1)
        dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
        batch = synthetic_batch(cfg, objective.batch_fields, device, dtype)

        def step() -> None:
            loss, _ = objective.loss(engine(**objective.model_inputs(batch)), batch)
            engine.backward(loss)
            engine.step()

        timed = time_steps(step, device, warmup, steps)
        timed["overflow_scans_per_step"] = len(scans) / (warmup + steps)
        ops = device_ops_per_step(step, device)
    engine.destroy()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {**timed, "device_ops_per_step": ops}


def plain_variant(cfg: Any, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """The same model, loss, clipping and AdamW in plain torch with bf16 weights."""
    from kiln.models.build import build_model
    from kiln.training.engine import adamw_args
    from kiln.training.objectives import build_objective

    assert cfg.objective is not None
    objective = build_objective(cfg.objective)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device=device, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(
        model.parameters(), fused=device.type == "cuda", **adamw_args(cfg.optim)
    )
    batch = synthetic_batch(cfg, objective.batch_fields, device, torch.bfloat16)

    def step() -> None:
        loss, _ = objective.loss(model(**objective.model_inputs(batch)), batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    timed = time_steps(step, device, warmup, steps)
    return {**timed, "device_ops_per_step": device_ops_per_step(step, device)}


def hand_over(cfg: Any, device: torch.device, repeats: int = 20) -> dict[str, dict[str, float]]:
    """ms a batch and ms the calling thread is blocked, per way of moving a batch's images
    (and token ids) to `device` as the model's input."""
    from kiln.models.preprocess import normalize_pixels
    from kiln.training.data import Batch

    b, size = cfg.data.batch_size, cfg.model.vision.image_size
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (b, 3, size, size), generator=gen, dtype=torch.uint8)
    tokens = torch.randint(1, 1000, (b, cfg.model.context_length), generator=gen)
    uids = [str(i) for i in range(b)]
    fields = ("images", "tokens")
    floats = Batch(normalize_pixels(pixels), tokens, uids)

    def before(_: int) -> Any:
        images = floats.images.to(device, torch.bfloat16, non_blocking=True)
        return images, tokens.to(device, non_blocking=True)

    pageable = Batch(pixels, tokens, uids)
    ways: dict[str, Callable[[int], Any]] = {
        "float32_pageable": before,
        "uint8_pageable": lambda _: pageable.to(device, torch.bfloat16, fields),
    }
    if device.type == "cuda":
        pinned = [pageable.pinned() for _ in range(4)]  # as the hand-over thread makes them
        ways["uint8_pinned"] = lambda i: pinned[i % 4].to(device, torch.bfloat16, fields)
    out = {}
    for name, move in ways.items():
        for i in range(3):
            move(i)
        _sync(device)
        blocked, started = 0.0, time.perf_counter()
        for i in range(repeats):
            t = time.perf_counter()
            move(i)
            blocked += time.perf_counter() - t
        _sync(device)
        out[name] = {
            "ms": round(1e3 * (time.perf_counter() - started) / repeats, 3),
            "blocked_ms": round(1e3 * blocked / repeats, 3),
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flavor", default="clip-vit-b-16")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per build")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per build")
    ap.add_argument("--rounds", type=int, default=2, help="builds of each engine variant")
    args = ap.parse_args(argv)
    if min(args.batch_size, args.steps, args.rounds) < 1 or args.warmup < 0:
        ap.error("--batch-size, --steps and --rounds must be at least 1, --warmup 0+")

    from kiln.training.engine import init_distributed, prebuild_comm_ops, set_runtime_env

    set_runtime_env()
    cuda = torch.cuda.is_available()
    flavor, batch, warmup, steps, rounds = (
        args.flavor,
        args.batch_size,
        args.warmup,
        args.steps,
        args.rounds,
    )
    cpu_smoke = not cuda
    if cpu_smoke:
        _log(
            f"no CUDA GPU on this machine: skipping the GPU measurement ({flavor}); running "
            f"the CPU smoke configuration instead ({SMOKE_FLAVOR}, bf16, batch {SMOKE_BATCH}, "
            f"{SMOKE_WARMUP} + {SMOKE_STEPS} steps, 1 round) so this script is exercised. "
            "Its figures are not GPU figures."
        )
        flavor, batch, warmup, steps, rounds = (
            SMOKE_FLAVOR,
            SMOKE_BATCH,
            SMOKE_WARMUP,
            SMOKE_STEPS,
            1,
        )
        torch.set_num_threads(1)
    cfg = bench_config(flavor, batch, dataset="synthetic (not read)", max_steps=100, offload=False)
    if cpu_smoke:
        cfg.zero.precision = "bf16"  # so DeepSpeed's scan runs (in fp32 it never does)
    from kiln.training.launch import free_port

    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    prebuild_comm_ops()
    init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    _log(f"{flavor}, batch {batch}, on {name}: {rounds} round(s) of {warmup} + {steps} steps")

    runs: dict[str, list[dict[str, Any]]] = {"deepspeed_overflow_scan": [], "kiln": []}
    for _ in range(rounds):
        for variant in runs:
            stock = variant == "deepspeed_overflow_scan"
            runs[variant].append(engine_variant(cfg, device, stock, warmup, steps))
    variants: dict[str, Any] = {}
    for variant, results in runs.items():
        variants[variant] = {
            "ms_per_step": [round(r["ms"], 2) for r in results],
            "cpu_ms_per_step": [round(r["cpu_ms"], 2) for r in results],
            "median_samples_per_s": round(
                batch / statistics.median(r["ms"] for r in results) * 1e3, 1
            ),
            "overflow_scans_per_step": results[0]["overflow_scans_per_step"],
            "device_ops_per_step": results[0]["device_ops_per_step"],
        }
    plain = plain_variant(cfg, device, warmup, steps)
    variants["plain_torch"] = {
        "ms_per_step": [round(plain["ms"], 2)],
        "cpu_ms_per_step": [round(plain["cpu_ms"], 2)],
        "median_samples_per_s": round(batch / plain["ms"] * 1e3, 1),
        "device_ops_per_step": plain["device_ops_per_step"],
    }
    figures = {
        "benchmark": "gpu_step",
        "gpu": cuda,
        "smoke": not cuda,
        "device": name,
        "flavor": flavor,
        "precision": "bf16",
        "zero_stage": cfg.zero.stage,
        "batch": batch,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "variants": variants,
        "hand_over": hand_over(cfg, device),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
