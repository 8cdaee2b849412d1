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

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kiln.training.objectives.base import Objective
from kiln.training.objectives.distributed import gather_with_grad, world_of

__all__ = ["ClipObjective", "clip_loss"]


def clip_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor,
    group: Any = None,
    *,
    equal_batches: bool = False,
) -> torch.Tensor:
    """Symmetric InfoNCE of matched rows of `img` and `txt` (``[n, D]``, L2-normalized).

    `logit_scale` is the temperature multiplier (already exponentiated, as the models
    return it). Computed in fp32. When torch.distributed is initialized with more than one
    rank, this is the rank's share of the global-batch loss (see the module docstring); the
    two towers' embeddings travel in one gather, so a step costs one all-gather forward and
    one all-reduce backward, plus a tiny all-gather checking the batch sizes unless
    `equal_batches` (`gather_with_grad`).
    """
    if img.shape != txt.shape or img.ndim != 2:
        raise ValueError(
            f"clip_loss: image embeddings {tuple(img.shape)} and text embeddings "
            f"{tuple(txt.shape)} must both be [batch, dim] with the same shape"
        )
    img, txt, scale = img.float(), txt.float(), logit_scale.float()
    rank, _ = world_of(group)
    n, d = img.shape
    both = gather_with_grad(torch.cat([img, txt], dim=1), group, equal_batches=equal_batches)
    all_img, all_txt = both[:, :d], both[:, d:]
    labels = torch.arange(n, device=img.device) + rank * n
    logits_per_image = scale * img @ all_txt.T
    logits_per_text = scale * txt @ all_img.T
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2


class ClipObjective(Objective):
    """CLIP: contrastive loss of image and text embeddings over the global batch."""

    name = "clip"
    batch_fields = ("images", "tokens")
    model_outputs: ClassVar[tuple[str, ...]] = ("image_embeds", "text_embeds", "logit_scale")

    def loss(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scale = outputs["logit_scale"]
        loss = clip_loss(
            outputs["image_embeds"],
            outputs["text_embeds"],
            scale,
            self.group,
            equal_batches=self.equal_batches,
        )
        return loss, {"logit_scale": scale.detach().float()}
