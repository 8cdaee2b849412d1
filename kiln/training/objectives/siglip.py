"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023), exact across data-parallel ranks.

Every image-text pair of the global batch is a binary classification: ``z_ij = +1`` for
matched pairs, ``-1`` otherwise, logit ``t x_i . y_j + b`` with a learnable temperature
``t`` (init 10) and bias ``b`` (init -10). The single-process loss over ``N`` pairs is
``-1/N sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b))``.

With ``W`` ranks of ``n`` rows, rank ``r`` scores its images against its own texts, then
(the paper's chunked exchange) passes text embeddings around a ring: ``W - 1`` times it
receives the previous rank's chunk and scores its images against it (all negatives). So a
rank holds two text chunks at most instead of the whole gathered batch. Its loss is the
sum over its rows divided by ``n``: the mean of the ranks' losses is the global loss, and
since the ring's backward returns each chunk's gradient to its owner, gradients averaged
over ranks are the global loss's (`tests/integration/test_siglip_loss_dist.py`, 2 and 3
gloo ranks). ``exchange: all_gather`` gathers all texts at once instead (same result).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from kiln.training.objectives.base import Objective
from kiln.training.objectives.distributed import (
    check_equal_batches,
    gather_with_grad,
    ring_shift,
    world_of,
)

__all__ = ["SiglipObjective", "siglip_loss"]


def _pair_loss(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, matched: bool
) -> torch.Tensor:
    logits = scale * img @ txt.T + bias
    if matched:
        labels = 2 * torch.eye(img.shape[0], txt.shape[0], device=img.device) - 1
    else:
        labels = -torch.ones_like(logits)
    return -F.logsigmoid(labels * logits).sum()


def siglip_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    group: Any = None,
    exchange: str = "ring",
    *,
    equal_batches: bool = False,
) -> torch.Tensor:
    """This rank's share of the global-batch sigmoid loss (see the module docstring).

    `img`, `txt` are L2-normalized ``[n, D]``; `logit_scale` is already exponentiated.
    Computed in fp32. `equal_batches`: the caller's word that every rank passes as many
    rows, which saves the check's collective (`gather_with_grad`).
    """
    if img.shape != txt.shape or img.ndim != 2:
        raise ValueError(
            f"siglip_loss: image embeddings {tuple(img.shape)} and text embeddings "
            f"{tuple(txt.shape)} must both be [batch, dim] with the same shape"
        )
    img, txt = img.float(), txt.float()
    scale, bias = logit_scale.float(), logit_bias.float()
    rank, world = world_of(group)
    n = img.shape[0]
    total = _pair_loss(img, txt, scale, bias, matched=True)
    if world > 1:
        if not equal_batches:
            check_equal_batches("siglip_loss", n, img.device, group)
        if exchange == "ring":
            chunk = txt
            for _ in range(world - 1):
                chunk = ring_shift(chunk, group)
                total = total + _pair_loss(img, chunk, scale, bias, matched=False)
        else:
            every = gather_with_grad(txt, group, equal_batches=True)  # checked above
            others = torch.cat([every[: rank * n], every[(rank + 1) * n :]])
            total = total + _pair_loss(img, others, scale, bias, matched=False)
    return total / n


class SiglipObjective(Objective):
    """SigLIP: sigmoid loss over every image-text pair of the global batch."""

    name = "siglip"
    batch_fields = ("images", "tokens")
    model_outputs = ("image_embeds", "text_embeds", "logit_scale", "logit_bias")

    def loss(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scale, bias = outputs["logit_scale"], outputs["logit_bias"]
        loss = siglip_loss(
            outputs["image_embeds"],
            outputs["text_embeds"],
            scale,
            bias,
            self.group,
            self.cfg.exchange,
            equal_batches=self.equal_batches,
        )
        return loss, {"logit_scale": scale.detach().float(), "logit_bias": bias.detach().float()}
