"""ZeRO-3 per-rank memory: parameters + optimizer state each rank holds, at N = 2 and 4
ranks, against ZeRO-0 (every rank holds everything).

Each setting runs N gloo ranks on this machine (CPU fp32, real DeepSpeed), building the
model as `kiln train` does (under `zero.Init` for ZeRO-3: no rank ever holds the whole
model) and the engine with kiln's DeepSpeed config, then takes one optimizer step (so the
Adam moments exist) and counts, on each rank, the bytes of its parameters (its partition
under ZeRO-3) and of every tensor in its optimizer's state dict (fp32 master partitions,
moments), each storage once. Goal (issue 8): ZeRO-3 <= 1/N of ZeRO-0, plus 10% (1.1/N). Prints JSON.
Run: python benchmarks/bench_zero_memory.py [--flavor clip-vit-ti-16] [--ranks 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen or obj.numel() == 0:
            return 0
        seen.add(key)
        return int(obj.untyped_storage().nbytes())
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def _rank(
    rank: int, world: int, port: int, stage: int, flavor: str, precision: str, out: str
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    import deepspeed

    from kiln.models.build import build_model
    from kiln.training.config import TrainConfig
    from kiln.training.engine import build_ds_config, build_engine

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=600))
    cfg = TrainConfig.model_validate(
        {
            "data": {"dataset": "unused", "batch_size": 2},
            "model": {"flavor": flavor, "text": {"tokenizer": "byte", "vocab_size": 259}},
            "zero": {"stage": stage, "precision": precision},
        }
    )
    torch.manual_seed(0)
    if stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=build_ds_config(cfg, world, cuda=False)):
            model = build_model(cfg.model)
    else:
        model = build_model(cfg.model)
    engine = build_engine(model, cfg, world)
    size = cfg.model.vision.image_size
    assert cfg.model.text is not None
    images = torch.rand(2, 3, size, size)
    tokens = torch.randint(3, 259, (2, cfg.model.text.context_length))
    out_ = engine(images, tokens)
    from kiln.training.objectives.clip import clip_loss

    engine.backward(clip_loss(out_["image_embeds"], out_["text_embeds"], out_["logit_scale"]))
    engine.step()
    seen: set[int] = set()
    params = 0
    for p in model.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        params += _tensor_bytes(t, seen)
    optimizer = _tensor_bytes(engine.optimizer.state_dict(), seen)
    total = torch.tensor([params, optimizer], dtype=torch.int64)
    gathered = [torch.zeros_like(total) for _ in range(world)]
    torch.distributed.all_gather(gathered, total)
    if rank == 0:
        per_rank = [{"params": int(g[0]), "optimizer": int(g[1])} for g in gathered]
        with open(out, "w") as f:
            json.dump(per_rank, f)
    engine.destroy()
    torch.distributed.destroy_process_group()


def measure(world: int, stage: int, flavor: str, precision: str) -> list[dict[str, int]]:
    from kiln.training.launch import free_port

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        args = (world, free_port(), stage, flavor, precision, out)
        mp.spawn(_rank, args=args, nprocs=world, join=True)
        with open(out) as f:
            result: list[dict[str, int]] = json.load(f)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flavor", default="clip-vit-ti-16")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--precision", choices=["fp32", "bf16"], nargs="+", default=["fp32", "bf16"])
    args = ap.parse_args()
    mb = 2**20
    results: dict[str, Any] = {"benchmark": "zero_memory", "flavor": args.flavor, "runs": []}
    for precision, n in [(p, n) for p in args.precision for n in args.ranks]:
        zero0 = measure(n, 0, args.flavor, precision)
        zero3 = measure(n, 3, args.flavor, precision)
        full = max(r["params"] + r["optimizer"] for r in zero0)
        most = max(r["params"] + r["optimizer"] for r in zero3)
        results["runs"].append(
            {
                "precision": precision,
                "ranks": n,
                "zero0_per_rank_mb": round(full / mb, 1),
                "zero3_per_rank_mb": round(most / mb, 1),
                "zero3_params_mb": [round(r["params"] / mb, 1) for r in zero3],
                "zero3_optimizer_mb": [round(r["optimizer"] / mb, 1) for r in zero3],
                "zero3_over_zero0": round(most / full, 3),
                "goal": round(1.1 / n, 3),
                "met": most / full <= 1.1 / n,
            }
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
