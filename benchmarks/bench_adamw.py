"""Optimizer step, CPU: kiln's AdamW against torch's, on a flavor's real parameter shapes.

Two layouts of the same parameters: the model's own tensors (a plain loop, ZeRO-0), and
one flat fp32 tensor holding them all (what a ZeRO-1/2/3 rank's optimizer steps: its
partition; one rank here). Random gradients, kiln's hyperparameters, one warm-up step
(the state is allocated there), then ``--steps`` timed steps by process CPU time on one
torch thread (``--threads``). Also timed for reference: torch's fused CPU kernel
(``fused=True``), which kiln does not use on CPU because it rounds differently.

Every timed kiln step is checked bitwise against torch's (parameters and state), so the
speed-up is for the same numbers. Prints JSON.
Run: python benchmarks/bench_adamw.py [--flavor clip-vit-s-32] [--steps 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from kiln.models.build import build_model
from kiln.models.config import ModelConfig
from kiln.training.config import OptimConfig
from kiln.training.engine import adamw_args
from kiln.training.optim import AdamW


def _params(flavor: str, flat: bool) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    model = build_model(ModelConfig.model_validate({"flavor": flavor}))
    tensors = [p.detach() for p in model.parameters()]
    if flat:
        tensors = [torch.cat([t.reshape(-1) for t in tensors])]
    params = [torch.nn.Parameter(t.clone()) for t in tensors]
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def _time(make: Any, params: list[torch.nn.Parameter], steps: int) -> tuple[float, Any]:
    opt = make(params)
    opt.step()  # warm-up: the state is allocated here
    cpu = time.process_time()
    for _ in range(steps):
        opt.step()
    return (time.process_time() - cpu) / steps, opt


def _same(a: list[torch.nn.Parameter], b: list[torch.nn.Parameter], oa: Any, ob: Any) -> bool:
    if not all(torch.equal(x, y) for x, y in zip(a, b, strict=True)):
        return False
    for x, y in zip(a, b, strict=True):
        sa, sb = oa.state[x], ob.state[y]
        if any(not torch.equal(sa[k], sb[k]) for k in ("step", "exp_avg", "exp_avg_sq")):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flavor", default="clip-vit-s-32", help="the model (`kiln model list`)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kw = adamw_args(OptimConfig())  # kiln's defaults, as `kiln train` passes them
    results = []
    for flat in (True, False):
        runs: dict[str, tuple[float, Any, list[torch.nn.Parameter]]] = {}
        makers = {
            "torch": lambda ps: torch.optim.AdamW(ps, **kw),
            "kiln": lambda ps: AdamW(ps, **kw),
            "torch_fused": lambda ps: torch.optim.AdamW(ps, fused=True, **kw),
        }
        for name, make in makers.items():
            params = _params(args.flavor, flat)
            seconds, opt = _time(make, params, args.steps)
            kept = name != "torch_fused"  # only kiln's and torch's are compared
            runs[name] = (seconds, opt if kept else None, params if kept else [])
            del opt, params
        torch_s, torch_opt, torch_params = runs["torch"]
        kiln_s, kiln_opt, kiln_params = runs["kiln"]
        row = {
            "layout": "one flat partition" if flat else "the model's tensors",
            "tensors": len(kiln_params),
            "elements": sum(p.numel() for p in kiln_params),
            "cpu_s_per_step": {name: round(r[0], 4) for name, r in runs.items()},
            "kiln_speedup_over_torch": round(torch_s / kiln_s, 2),
            "kiln_bitwise_equal_to_torch": _same(kiln_params, torch_params, kiln_opt, torch_opt),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {"benchmark": "adamw", "flavor": args.flavor, "threads": args.threads}
    print(json.dumps({**report, "results": results}, indent=2))


if __name__ == "__main__":
    main()
