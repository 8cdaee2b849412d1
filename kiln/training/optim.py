"""kiln's AdamW: torch's algorithm and numbers, stepped in cache-sized slices on CPU.

torch's AdamW on CPU (its default single-tensor path) runs each update as six passes over
the whole parameter, plus a temporary as large as the parameter for the denominator. Under
ZeRO the parameter is one flat fp32 partition holding everything the rank owns (252 MB for
ViT-S/32 on one rank), so every pass streams it through memory and the temporary is faulted
in anew each step: about a second a step at that size, most of it waiting on memory.

Every operation of the update is elementwise, so running the same operations, in the same
order, on one slice at a time gives the same bits while the slice stays in cache, and the
denominator reuses one slice-sized buffer. `AdamW` is that: a `torch.optim.AdamW` whose
state, state dict, hooks and numbers are torch's (asserted bitwise in the tests), and whose
CPU step is 2.9-3.2x faster on a large flat partition and 1.5-1.9x on a model's own tensors
(`benchmarks/bench_adamw.py`, clip-vit-s-32). Anything the sliced step does not cover
(CUDA or other devices, where ``fused=True`` is the fast path; ``amsgrad``, ``maximize``,
``capturable``, ``differentiable``, ``foreach``/``fused`` asked for, tensor learning rates,
complex or sparse tensors) runs torch's own step unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["AdamW", "slice_elements"]


def slice_elements() -> int:
    """Elements per slice: 1 MB of fp32 per tensor (four tensors and the buffer stay in L2/L3),
    and never less than 32k elements per torch thread, so an op still splits across threads."""
    return max(1 << 18, (1 << 15) * torch.get_num_threads())


def _state_step_dtype() -> torch.dtype:
    """The dtype torch.optim keeps a non-capturable, non-fused step count in."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class AdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` whose CPU step runs slice by slice (module doc). Same arguments,
    same state and state dict, bitwise the same parameters after every step."""

    def _sliceable(self) -> bool:
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or group["capturable"]:
                return False
            if group["differentiable"] or group["fused"] or group["foreach"]:
                return False
            if not isinstance(group["lr"], float | int):
                return False
            if not all(isinstance(b, float | int) for b in group["betas"]):
                return False
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if p.device.type != "cpu" or g.device.type != "cpu" or g.is_sparse:
                    return False
                if torch.is_complex(p) or not p.is_floating_point() or g.dtype != p.dtype:
                    return False
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """One AdamW update of every parameter with a gradient; `closure` as in torch."""
        if not self._sliceable():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        size = slice_elements()
        buffers: dict[torch.dtype, torch.Tensor] = {}
        for group in self.param_groups:
            lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]
            beta1, beta2 = (float(b) for b in group["betas"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=_state_step_dtype())
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                step_t = state["step"]
                step_t += 1
                step = step_t.item()
                bias_correction2_sqrt = (1 - beta2**step) ** 0.5
                step_size = lr / (1 - beta1**step)
                buf = buffers.get(p.dtype)
                if buf is None:
                    buf = buffers[p.dtype] = torch.empty(size, dtype=p.dtype)
                grad, m, v = p.grad, state["exp_avg"], state["exp_avg_sq"]
                args = {
                    "lr": lr,
                    "wd": wd,
                    "beta1": beta1,
                    "beta2": beta2,
                    "eps": eps,
                    "step_size": step_size,
                    "bias_correction2_sqrt": bias_correction2_sqrt,
                }
                n = p.numel()
                if n > size and all(t.is_contiguous() for t in (p, grad, m, v)):
                    flat = [t.view(-1) for t in (p, grad, m, v)]
                    for start in range(0, n, size):
                        stop = min(start + size, n)
                        p_, g_, m_, v_ = (t[start:stop] for t in flat)
                        _update(p_, g_, m_, v_, buf[: stop - start], **args)
                else:
                    out = buf[:n].view(p.shape) if n <= size else None
                    _update(p, grad, m, v, out, **args)
        return loss


def _update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    denom_out: torch.Tensor | None,
    *,
    lr: float,
    wd: float,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    bias_correction2_sqrt: float,
) -> None:
    """torch's single-tensor AdamW update on one slice, operation for operation
    (`torch.optim.adam._single_tensor_adam`, decoupled weight decay, no amsgrad)."""
    if wd != 0:
        param.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    root = exp_avg_sq.sqrt() if denom_out is None else torch.sqrt(exp_avg_sq, out=denom_out)
    denom = root.div_(bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
