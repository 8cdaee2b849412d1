"""CoCa's loss: a weighted sum of CLIP's contrastive loss and a captioning loss.

The captioning loss is next-token cross-entropy of the multimodal decoder's logits against
the ids the model says they predict (``caption_targets``: position ``t``'s is token
``t + 1``); ``PAD_ID`` targets (after the end-of-text token) are ignored.
Both parts are exact over the global batch: the contrastive part through `clip_loss`; the
captioning part is the mean over every rank's caption tokens, each rank dividing its sum
by the ranks' mean token count (one all-reduce of a count). So the mean of the ranks'
losses, and the gradients averaged over ranks, are one process's over the global batch
however the caption tokens fall across ranks (`tests/integration/test_coca_loss_dist.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kiln.models.tokenizer import PAD_ID
from kiln.training.objectives.clip import ClipObjective
from kiln.training.objectives.distributed import world_of

__all__ = ["CocaObjective", "caption_loss"]


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Cross-entropy of ``logits [..., V]`` against the ids they predict, ``targets [...]``
    (the same leading shape), ``PAD_ID`` targets skipped: the mean over this rank's tokens
    in one process; with several ranks, this rank's share of the mean over all ranks'
    tokens (see the module docstring)."""
    flat = targets.reshape(-1)
    pred = logits.float().reshape(-1, logits.shape[-1])
    total = F.cross_entropy(pred, flat, ignore_index=PAD_ID, reduction="sum")
    count = (flat != PAD_ID).sum().to(total.dtype)
    _, world = world_of(group)
    if world > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
        count = count / world
    return total / count.clamp(min=1)


class CocaObjective(ClipObjective):
    """CoCa: contrastive (CLIP's loss, `ClipObjective`) + captioning."""

    name = "coca"
    batch_fields = ("images", "tokens")
    model_outputs = (
        "image_embeds",
        "text_embeds",
        "logit_scale",
        "caption_logits",
        "caption_targets",
    )

    def loss(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        contrastive, logs = super().loss(outputs, batch)
        caption = caption_loss(outputs["caption_logits"], outputs["caption_targets"], self.group)
        loss = self.cfg.contrastive_weight * contrastive + self.cfg.caption_weight * caption
        return loss, {
            "contrastive_loss": contrastive.detach(),
            "caption_loss": caption.detach(),
            **logs,  # logit_scale
        }
