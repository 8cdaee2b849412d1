"""CLIP's symmetric InfoNCE loss, exact across data-parallel ranks.

With ``W`` ranks each holding ``n`` rows of a global batch of ``N = W n`` pairs, rank ``r``
gathers every rank's embeddings *with gradient*, scores its own ``n`` images against all
``N`` texts (and its ``n`` texts against all ``N`` images), and the correct column of its
row ``i`` is ``r n + i``. Its loss is the mean over its rows of the two cross-entropies,
halved. The gather's backward sums, across ranks, the gradient every rank's loss sends to a
rank's embeddings; so after the usual gradient *averaging* over ranks (what DeepSpeed and
DDP do) the parameter gradients equal those of one process computing the mean over all
``N`` rows of the global batch, and the mean of the ranks' logged losses is that global
loss. `tests/integration/test_clip_loss_dist.py` checks both with real gloo groups.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["ClipLoss", "clip_loss", "gather_with_grad"]


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


def _world(group: Any) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _check_equal_batches(n: int, device: torch.device, group: Any, world: int) -> None:
    """Refuse unequal local batches on every rank alike (one tiny all-gather)."""
    on_device = dist.get_backend(group) == dist.Backend.NCCL
    local = torch.tensor([n], dtype=torch.long, device=device if on_device else "cpu")
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    counts = [int(s.item()) for s in sizes]
    if len(set(counts)) != 1:
        raise ValueError(
            f"clip_loss: local batch sizes differ across ranks {counts}: the global-batch "
            "loss needs equal per-rank batches; drop the last partial batch in the loader"
        )


def gather_with_grad(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Every rank's `x` concatenated along dim 0 in rank order, differentiable.

    Every rank must pass the same shape (checked: a clear error rather than a hang).
    """
    _, world = _world(group)
    if world == 1:
        return x
    _check_equal_batches(x.shape[0], x.device, group, world)
    out: torch.Tensor = _GatherWithGrad.apply(x, group)
    return out


def clip_loss(
    img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, group: Any = None
) -> torch.Tensor:
    """Symmetric InfoNCE of matched rows of `img` and `txt` (``[n, D]``, L2-normalized).

    `logit_scale` is the temperature multiplier (already exponentiated, as `CLIP.forward`
    returns it). Computed in fp32. When torch.distributed is initialized with more than one
    rank, this is the rank's share of the global-batch loss (see the module docstring); the
    two towers' embeddings travel in one gather, so a step costs one all-gather forward and
    one all-reduce backward (plus a tiny all-gather checking the batch sizes).
    """
    if img.shape != txt.shape or img.ndim != 2:
        raise ValueError(
            f"clip_loss: image embeddings {tuple(img.shape)} and text embeddings "
            f"{tuple(txt.shape)} must both be [batch, dim] with the same shape"
        )
    img, txt, scale = img.float(), txt.float(), logit_scale.float()
    rank, _ = _world(group)
    n, d = img.shape
    both = gather_with_grad(torch.cat([img, txt], dim=1), group)
    all_img, all_txt = both[:, :d], both[:, d:]
    labels = torch.arange(n, device=img.device) + rank * n
    logits_per_image = scale * img @ all_txt.T
    logits_per_text = scale * txt @ all_img.T
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2


class ClipLoss(nn.Module):
    """`clip_loss` as a module, bound to a process group (default: the world)."""

    def __init__(self, group: Any = None):
        super().__init__()
        self.group = group

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        return clip_loss(img, txt, logit_scale, self.group)
