"""GPU training throughput: samples/s and MFU of a CLIP flavor (default clip-vit-b-16) in
bf16 under DeepSpeed ZeRO-2, on 1 GPU or all of this machine's GPUs.

What is timed is kiln's own training step: the model from `kiln.models.build`, the
DeepSpeed engine from `kiln.training.engine.build_engine` (kiln's DeepSpeed config: bf16,
ZeRO-2, torch's fused AdamW, gradient clipping), the loss from the flavor's objective.

- ``--mode synthetic`` (default): one batch of random images and token ids generated on
  each GPU before timing, fed to every step, so the figure is the model + DeepSpeed step and
  nothing of the loader. N GPUs: one process per GPU (NCCL), each with its own batch.
- ``--mode loader``: ``kiln train`` itself on ``--dataset`` (local launcher, one rank per
  GPU, the real WebDataset loader), timed from the run's per-step metrics.

``--warmup`` steps are excluded; the next ``--steps`` are timed (CUDA synchronized at both
ends; with N GPUs the slowest rank's time). MFU = samples/s x the flavor's training FLOPs
per sample (`kiln.models.info.flops_per_sample`: 3x the forward, as `kiln model info`
prints) / (GPUs x peak dense bf16 FLOP/s), the peak from the table below by device name,
or ``--peak-tflops``. In ``--mode loader`` the text tower computes each caption's own
positions (it packs captions of mixed length), fewer than the full context that
`flops_per_sample` counts, so MFU there is an upper bound. Prints one JSON line.

Without CUDA the GPU part is skipped (a ``[kiln]`` line says so) and a CPU smoke
configuration runs instead (tiny flavor, fp32, 1 process, a few steps) so the script itself
stays tested; its MFU is null.

Run: python benchmarks/gpu_train.py [--flavor clip-vit-b-16] [--batch-size 256]
     [--gpus N] [--warmup 10] [--steps 50] [--peak-tflops T] [--offload-optimizer]
     [--mode synthetic|loader --dataset DIR [--loader-workers 6] [--fast-decode]]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import ValidationError

from kiln.training.config import TrainConfig

#: Peak dense (no sparsity) bf16 tensor-core TFLOP/s per GPU, from the vendors' data sheets.
#: Matched in order against torch.cuda.get_device_name(), case-insensitively (so more
#: specific names come first: "H100 PCIe" before "H100", "A100" before "A10").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),  # SXM, and GH200
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
)

#: The CPU smoke configuration: small enough to run in seconds on 2 cores.
SMOKE_FLAVOR, SMOKE_BATCH, SMOKE_WARMUP, SMOKE_STEPS = "clip-tiny", 8, 2, 3


def peak_bf16_tflops(device_name: str) -> tuple[float, str] | None:
    """(peak dense bf16 TFLOP/s, matched table entry) for a device name, None if unknown."""
    name = device_name.lower()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name:
            return tflops, key
    return None


def bench_config(
    flavor: str,
    batch_size: int,
    *,
    dataset: str,
    max_steps: int,
    offload: bool,
    loader_workers: int = 1,
    fast_decode: bool = False,
) -> TrainConfig:
    """The TrainConfig the benchmark trains: the flavor, ZeRO-2, precision auto (bf16 on
    GPU, fp32 on CPU), no checkpoints inside the timed steps."""
    return TrainConfig.model_validate(
        {
            "data": {
                "dataset": dataset,
                "batch_size": batch_size,
                "num_workers": loader_workers,
                "fast_decode": fast_decode,
            },
            "model": {"flavor": flavor},
            "zero": {"stage": 2, "offload_optimizer": "cpu" if offload else "none"},
            "checkpoint": {"every_steps": max_steps, "model_file": "never"},
            "max_steps": max_steps,
            "log_every": max_steps,
        }
    )


def synthetic_batch(
    cfg: TrainConfig, fields: tuple[str, ...], device: torch.device, image_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Random inputs for `fields`, generated on `device`: images ~ N(0, 1), full-length
    token ids (no padding, so every position costs what `flops_per_sample` counts)."""
    from kiln.models.tokenizer import PAD_ID

    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    b, size = cfg.data.batch_size, cfg.model.vision.image_size
    batch: dict[str, torch.Tensor] = {}
    for name in fields:
        if name == "images":
            batch[name] = torch.randn(
                b, 3, size, size, generator=gen, device=device, dtype=image_dtype
            )
        elif name == "tokens":
            text = cfg.model.text
            assert text is not None  # objectives that read tokens have a text tower
            batch[name] = torch.randint(
                PAD_ID + 1, text.vocab_size, (b, text.context_length), generator=gen, device=device
            )
        elif name == "sample_seeds":
            batch[name] = torch.randint(0, 2**62, (b,), generator=gen, device=device)
        else:
            raise ValueError(f"no synthetic data for batch field {name!r}")
    return batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_rank(cfg: TrainConfig, warmup: int, steps: int) -> dict[str, Any]:
    """Time `steps` training steps on synthetic batches in this rank (after `warmup`);
    collective over the world the launcher's environment describes."""
    from kiln.models.build import build_model
    from kiln.training.engine import build_engine, init_distributed, use_bf16
    from kiln.training.objectives import build_objective

    created = init_distributed()
    world = dist.get_world_size()
    assert cfg.objective is not None  # TrainConfig fills in the flavor's objective
    objective = build_objective(cfg.objective)
    torch.manual_seed(cfg.seed)
    engine = build_engine(build_model(cfg.model), cfg, world)
    device = torch.device(engine.device)
    bf16 = use_bf16(cfg)
    batch = synthetic_batch(
        cfg, objective.batch_fields, device, torch.bfloat16 if bf16 else torch.float32
    )

    def step() -> torch.Tensor:
        outputs = engine(**objective.model_inputs(batch))
        loss, _ = objective.loss(outputs, batch)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    for _ in range(warmup):
        step()
    _sync(device)
    dist.barrier()
    started = time.perf_counter()
    losses = [step() for _ in range(steps)]
    _sync(device)
    elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank bounds every step
    memory = torch.tensor(
        [torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    result = {
        "elapsed_s": float(elapsed.item()),
        "final_loss": float(losses[-1].float().item()),
        "max_memory_gb": round(float(memory.item()) / 2**30, 2) if device.type == "cuda" else None,
        "bf16": bf16,
        "world_size": world,
    }
    engine.destroy()
    if created:
        dist.destroy_process_group()
    return result


def _rank_entry(
    rank: int, world: int, port: int, cfg_json: str, warmup: int, steps: int, out: str
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    result = synthetic_rank(TrainConfig.model_validate_json(cfg_json), warmup, steps)
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def run_synthetic(cfg: TrainConfig, world: int, warmup: int, steps: int) -> dict[str, Any]:
    """`synthetic_rank` on `world` processes (this one when 1); rank 0's result."""
    from kiln.training.launch import free_port

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        args = (world, free_port(), cfg.model_dump_json(), warmup, steps, out)
        if world == 1:
            _rank_entry(0, *args)
        else:
            import torch.multiprocessing as mp

            mp.spawn(_rank_entry, args=args, nprocs=world, join=True)
        result: dict[str, Any] = json.loads(Path(out).read_text())
    result["samples_per_s"] = cfg.data.batch_size * world * steps / result["elapsed_s"]
    return result


def run_loader(cfg: TrainConfig, world: int, warmup: int, steps: int, cuda: bool) -> dict[str, Any]:
    """`kiln train` (local launcher, one rank per GPU) for warmup + steps steps; samples/s
    over the timed steps from the run's per-step metrics (loader waits included)."""
    from kiln.training import train
    from kiln.training.engine import use_bf16
    from kiln.training.loop import METRICS_FILE

    with tempfile.TemporaryDirectory() as d:
        summary = train(
            cfg,
            str(Path(d) / "run"),
            num_workers=world,
            gpus_per_worker=1.0 if cuda else 0.0,
            launcher="local",
        )
        lines = (Path(summary.run_dir) / METRICS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    timed = [r for r in records if r["step"] > warmup]
    per_step = cfg.data.batch_size * cfg.optim.grad_accum * world
    elapsed = sum(per_step / r["samples_per_s"] for r in timed)
    return {
        "elapsed_s": elapsed,
        "final_loss": timed[-1]["loss"],
        "max_memory_gb": None,  # measured inside the ranks' own processes; not reported
        "bf16": use_bf16(cfg, cuda=cuda),
        "world_size": summary.world_size,
        "samples_per_s": per_step * len(timed) / elapsed,
    }


def _significant(value: float, digits: int = 4) -> float:
    """`value` to `digits` significant digits: a CPU smoke run's MFU (~0.002) keeps its
    precision, which rounding to decimal places did not."""
    return float(f"{value:.{digits}g}")


def _log(msg: str) -> None:
    sys.stdout.write(f"[kiln] {msg}\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flavor", default="clip-vit-b-16")
    ap.add_argument("--batch-size", type=int, default=256, help="samples per GPU per step")
    ap.add_argument("--gpus", type=int, default=None, help="default: every visible GPU")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=50, help="timed steps")
    ap.add_argument("--mode", choices=["synthetic", "loader"], default="synthetic")
    ap.add_argument("--dataset", default=None, help="--mode loader: a `kiln curate` dataset")
    ap.add_argument(
        "--loader-workers", type=int, default=6, help="--mode loader: DataLoader workers per GPU"
    )
    ap.add_argument(
        "--fast-decode",
        action="store_true",
        help="--mode loader: data.fast_decode (reduced-size JPEG decode; changes pixels)",
    )
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s per GPU")
    ap.add_argument("--offload-optimizer", action="store_true", help="zero.offload_optimizer: cpu")
    args = ap.parse_args(argv)
    if args.mode == "loader" and not args.dataset:
        ap.error("--mode loader needs --dataset DIR (a dataset written by `kiln curate`)")
    if min(args.batch_size, args.steps, args.loader_workers + 1) < 1 or args.warmup < 0:
        ap.error("--batch-size and --steps must be at least 1, --warmup and --loader-workers 0+")

    from kiln.training.engine import prebuild_comm_ops, prebuild_offload_ops, set_runtime_env

    set_runtime_env()
    cuda = torch.cuda.is_available()

    def config(flavor: str, batch_size: int, steps: int, loader_workers: int) -> TrainConfig:
        try:
            return bench_config(
                flavor,
                batch_size,
                dataset=args.dataset or "synthetic (not read)",
                max_steps=steps,
                offload=args.offload_optimizer,
                loader_workers=loader_workers,
                fast_decode=args.fast_decode,
            )
        except ValidationError as e:  # e.g. an unknown --flavor: the message lists valid ones
            ap.error(str(e))

    # validated on every machine, so bad input fails here as it would on a GPU one
    cfg = config(args.flavor, args.batch_size, args.warmup + args.steps, args.loader_workers)
    warmup, steps = args.warmup, args.steps
    if cuda:
        world = args.gpus or torch.cuda.device_count()
        if not 1 <= world <= torch.cuda.device_count():
            ap.error(f"--gpus {world}: this machine has {torch.cuda.device_count()} GPU(s)")
        device_name = torch.cuda.get_device_name(0)
    else:
        _log(
            f"no CUDA GPU on this machine: skipping the GPU benchmark ({args.flavor}, bf16, "
            f"ZeRO-2); running the CPU smoke configuration instead ({SMOKE_FLAVOR}, fp32, "
            f"batch {SMOKE_BATCH}, {SMOKE_WARMUP} + {SMOKE_STEPS} steps, "
            "1 process) so this script is exercised. Its figures are not GPU figures."
        )
        world, device_name = 1, "cpu"
        torch.set_num_threads(1)  # as the local launcher pins each rank (1 CPU per worker)
        warmup, steps = SMOKE_WARMUP, SMOKE_STEPS
        cfg = config(SMOKE_FLAVOR, SMOKE_BATCH, warmup + steps, 1)
    flavor, batch_size = cfg.model.flavor, cfg.data.batch_size
    if args.peak_tflops is not None:
        peak: float | None = args.peak_tflops
        peak_source: str | None = "--peak-tflops"
    elif cuda and (match := peak_bf16_tflops(device_name)) is not None:
        peak, peak_source = match[0], f"table: {match[1]}"
    else:
        peak, peak_source = None, None
        if cuda:
            _log(f"no peak bf16 TFLOP/s known for {device_name!r}: pass --peak-tflops for MFU")

    prebuild_comm_ops()
    prebuild_offload_ops(cfg)
    _log(
        f"{args.mode}: {flavor}, batch {batch_size} per rank x {world} rank(s) on {device_name}, "
        f"{warmup} warmup + {steps} timed steps"
    )
    if args.mode == "synthetic":
        result = run_synthetic(cfg, world, warmup, steps)
    else:
        result = run_loader(cfg, world, warmup, steps, cuda)

    from kiln.models.info import flops_per_sample

    train_flops = flops_per_sample(cfg.model)["train"]
    samples_per_s = float(result["samples_per_s"])
    achieved = samples_per_s * train_flops / world / 1e12
    figures = {
        "benchmark": "gpu_train",
        "mode": args.mode,
        "gpu": cuda,
        "smoke": not cuda,
        "device": device_name,
        "flavor": flavor,
        "precision": "bf16" if result["bf16"] else "fp32",
        "zero_stage": cfg.zero.stage,
        "offload_optimizer": cfg.zero.offload_optimizer,
        "fast_decode": cfg.data.fast_decode,
        "world_size": result["world_size"],
        "batch_per_gpu": batch_size,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "step_s": round(result["elapsed_s"] / steps, 5),
        "samples_per_s": round(samples_per_s, 2),
        "samples_per_s_per_gpu": round(samples_per_s / world, 2),
        "train_gflops_per_sample": round(train_flops / 1e9, 3),
        "achieved_tflops_per_gpu": _significant(achieved),
        "peak_tflops_per_gpu": peak,
        "peak_source": peak_source,
        "mfu": _significant(achieved / peak) if peak else None,
        "max_memory_gb": result["max_memory_gb"],
        "final_loss": result["final_loss"],
    }
    if not math.isfinite(figures["final_loss"]):
        raise RuntimeError(f"the benchmark's loss is not finite ({figures['final_loss']})")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
