"""The kernel behind every linear map of kiln's models (`Linear`): which GEMM library runs it.

torch sends an fp32 ``linear`` / ``mm`` on CPU to MKL's sgemm. MKL picks its kernels by CPU
vendor, and on AMD CPUs it runs its AVX2 ones even where the core has AVX-512: on a Zen 5
EPYC, 93-99 GFLOP/s a core at a ViT-S/32's shapes, where oneDNN (which torch also ships,
for its bf16 and fused kernels) runs the same fp32 products at 160-210 GFLOP/s. GEMMs are
80% or more of a CPU training step, so on such hosts the library is most of the step's
speed (1.8x on `clip-vit-s-32`'s whole step: `benchmarks/bench_openclip.py`).

So on CPU, fp32, outside autocast, kiln computes ``x W^T + b`` and both of its backward
products (``grad W^T`` for the input, ``grad^T x`` for the weight) with oneDNN, through
torch's own binding (``torch.ops.mkldnn._linear_pointwise``, the op torch's compiler emits
for the same job). The numbers stay fp32 IEEE: the products are summed in a different
order than MKL sums them (rounding-level differences, like moving to another CPU), never
in reduced precision. Results are deterministic for a given machine and thread count, so
bitwise resume holds. Products under ``MIN_MACS`` multiply-adds stay with torch (oneDNN's
fixed cost per call, ~10 us, outweighs its speed there), as does everything off CPU, in
other dtypes, under autocast, or where the op is missing.

``KILN_CPU_GEMM=torch`` (or `set_cpu_gemm("torch")`) keeps torch's default everywhere, for
bitwise comparisons with other torch code; ``onednn`` is the default.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["CPU_GEMMS", "MIN_MACS", "cpu_gemm", "linear", "set_cpu_gemm"]

#: the choices of ``KILN_CPU_GEMM`` / `set_cpu_gemm`
CPU_GEMMS = ("onednn", "torch")

#: smallest product (rows x in x out multiply-adds) sent to oneDNN: below it torch's call
#: is faster (a 64x64x64 product: 8 us with MKL, 18 us with oneDNN; 544x64x64: 57 vs 33 us)
MIN_MACS = 1 << 20

_choice: str | None = None


def set_cpu_gemm(name: str) -> None:
    """Choose the library for CPU fp32 linear maps in this process (see module doc)."""
    global _choice
    if name not in CPU_GEMMS:
        raise ValueError(f"cpu gemm {name!r} is not one of {', '.join(CPU_GEMMS)}")
    _choice = name


def cpu_gemm() -> str:
    """The library CPU fp32 linear maps use in this process: ``onednn`` or ``torch``."""
    global _choice
    if _choice is None:
        name = os.environ.get("KILN_CPU_GEMM", "onednn")
        if name not in CPU_GEMMS:
            raise ValueError(
                f"KILN_CPU_GEMM={name!r} is not one of {', '.join(CPU_GEMMS)}; "
                "unset it for the default (onednn)"
            )
        _choice = name
    return _choice if _op() is not None else "torch"


@functools.cache
def _op() -> Any:
    """torch's oneDNN linear op, or None where this torch has none."""
    try:
        if torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        pass
    return None


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out: torch.Tensor = _op()(x, weight, bias, "none", [], "")
    return out


class _OneDNNLinear(torch.autograd.Function):
    """``x W^T + b`` with oneDNN in both directions. Saves `x` and `weight` themselves
    (not views), so a weight whose storage is swapped between forward and backward (ZeRO-3
    releases and re-gathers it) is read as it is at backward time."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(grad, weight.t(), None)
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = _product(rows.t(), x.reshape(-1, x.shape[-1]).t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() >= 2
        and x.numel() * weight.shape[0] >= MIN_MACS
        and not torch.is_autocast_enabled("cpu")
        and cpu_gemm() == "onednn"
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` (`torch.nn.functional.linear`'s contract), by the library the module doc
    picks for `x`'s device, dtype and size."""
    if not _use_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        out: torch.Tensor = _OneDNNLinear.apply(x, weight, bias)
        return out
    return _product(x, weight, bias)
