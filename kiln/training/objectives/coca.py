"""CoCa's loss: a weighted sum of CLIP's contrastive loss and a captioning loss.

The captioning loss is next-token cross-entropy of the multimodal decoder's logits against
the ids the model says they predict (``caption_targets``: position ``t``'s is token
``t + 1``); ``PAD_ID`` targets (after the end-of-text token) are ignored.
The contrastive part is exact over the global batch (`clip_loss`); the captioning part is
each rank's mean over its own tokens (ranks see equal batch sizes, but their captions'
token counts differ, so the mean over ranks weighs tokens slightly unevenly).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from kiln.models.tokenizer import PAD_ID
from kiln.training.objectives.base import Objective
from kiln.training.objectives.clip import clip_loss

__all__ = ["CocaObjective", "caption_loss"]


def caption_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [..., V]`` against the ids they predict,
    ``targets [...]`` (the same leading shape), ``PAD_ID`` targets skipped."""
    pred = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(pred, targets.reshape(-1), ignore_index=PAD_ID)


class CocaObjective(Objective):
    """CoCa: contrastive + captioning."""

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
        scale = outputs["logit_scale"]
        contrastive = clip_loss(outputs["image_embeds"], outputs["text_embeds"], scale, self.group)
        caption = caption_loss(outputs["caption_logits"], outputs["caption_targets"])
        loss = self.cfg.contrastive_weight * contrastive + self.cfg.caption_weight * caption
        return loss, {
            "contrastive_loss": contrastive.detach(),
            "caption_loss": caption.detach(),
            "logit_scale": scale.detach().float(),
        }
