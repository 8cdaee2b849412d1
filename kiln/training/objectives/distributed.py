"""Differentiable collectives the objectives use to compute global-batch losses.

- `gather_with_grad`: every rank's rows, in rank order; its backward hands each rank the
  summed gradient of its rows (CLIP, CoCa).
- `ring_shift`: send this rank's tensor to the next rank and receive the previous rank's
  (SigLIP's chunked exchange); its backward sends the gradient the other way round.

Both are exact: after the usual gradient *averaging* over ranks (what DeepSpeed and DDP
do), parameter gradients equal those of one process computing the mean loss over the
global batch. `tests/integration/test_clip_loss_dist.py` and
`tests/integration/test_siglip_loss_dist.py` check it with real gloo groups.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["check_equal_batches", "gather_with_grad", "ring_shift", "world_of"]


def world_of(group: Any = None) -> tuple[int, int]:
    """``(rank, world size)`` in `group`, ``(0, 1)`` when torch.distributed is not running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the summed gradient of its rows.

    Written here rather than taken from `torch.distributed.nn` because that one's backward
    needs all-to-all on non-NCCL backends, which gloo (kiln's CPU backend) lacks.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.world = dist.get_world_size(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        n = grad.shape[0] // ctx.world
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = torch.empty_like(grad[:n])
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
            return out, None
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * n : (ctx.rank + 1) * n].clone(), None


def check_equal_batches(name: str, n: int, device: torch.device, group: Any = None) -> None:
    """Refuse unequal local batches on every rank alike (one tiny all-gather, and a host
    sync on a GPU: what `equal_batches` saves a caller that knows its batches are equal)."""
    _, world = world_of(group)
    if world == 1:
        return
    on_device = dist.get_backend(group) == dist.Backend.NCCL
    local = torch.tensor([n], dtype=torch.long, device=device if on_device else "cpu")
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    counts = [int(s.item()) for s in sizes]
    if len(set(counts)) != 1:
        raise ValueError(
            f"{name}: local batch sizes differ across ranks {counts}: the global-batch "
            "loss needs equal per-rank batches; drop the last partial batch in the loader"
        )


def gather_with_grad(
    x: torch.Tensor, group: Any = None, *, equal_batches: bool = False
) -> torch.Tensor:
    """Every rank's `x` concatenated along dim 0 in rank order, differentiable.

    Every rank must pass the same shape: checked by `check_equal_batches` (a clear error
    rather than a hang, at the price of one more collective) unless `equal_batches`, the
    caller's word that every rank passes as many rows (kiln's loop checks each rank's
    batch against ``data.batch_size``, which is the same on every rank).
    """
    _, world = world_of(group)
    if world == 1:
        return x
    if not equal_batches:
        check_equal_batches("clip_loss", x.shape[0], x.device, group)
    out: torch.Tensor = _GatherWithGrad.apply(x, group)
    return out


def _exchange(x: torch.Tensor, to: int, frm: int, group: Any) -> torch.Tensor:
    """Send `x` to group rank `to`, receive a tensor like it from group rank `frm`."""
    x = x.contiguous()
    out = torch.empty_like(x)
    if group is not None:
        to, frm = dist.get_global_rank(group, to), dist.get_global_rank(group, frm)
    reqs = [dist.isend(x, to, group=group), dist.irecv(out, frm, group=group)]
    for req in reqs:
        if req is not None:
            req.wait()
    return out


class _RingShift(torch.autograd.Function):
    """Forward: receive the previous rank's tensor; backward: return its gradient to it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        rank, world = world_of(group)
        ctx.group, ctx.rank, ctx.world = group, rank, world
        return _exchange(x, (rank + 1) % world, (rank - 1) % world, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        r, w = ctx.rank, ctx.world
        return _exchange(grad, (r - 1) % w, (r + 1) % w, ctx.group), None


def ring_shift(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The previous rank's `x` (rank ``r`` gets rank ``r - 1``'s), differentiable.

    Applied ``k`` times, rank ``r`` holds rank ``r - k``'s tensor; the gradient that
    reaches it goes back along the same ring to its owner. Peer-to-peer traffic of one
    chunk at a time instead of a whole all-gather: each rank holds at most two chunks.
    """
    _, world = world_of(group)
    if world == 1:
        return x
    out: torch.Tensor = _RingShift.apply(x, group)
    return out
