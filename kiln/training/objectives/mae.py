"""MAE's loss: mean squared error of the predicted pixels on the masked patches only.

With ``norm_pix_loss`` (the paper's default and better representations) each target
patch is normalized by its own mean and variance first. Vision-only: the batch carries
images and per-sample seeds (which fix each sample's mask), no captions, so the loader
never reads or tokenizes text.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kiln.training.objectives.base import Objective

__all__ = ["MaeObjective", "mae_loss"]


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True
) -> torch.Tensor:
    """MSE over masked patches: `pred`, `target` ``[B, N, P]``, `mask` ``[B, N]`` (1 = hidden)."""
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MaeObjective(Objective):
    """MAE: reconstruct masked patches."""

    name = "mae"
    batch_fields = ("images", "sample_seeds")
    model_outputs = ("pred", "target", "mask")

    def model_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"images": batch["images"], "mask_seeds": batch["sample_seeds"]}

    def loss(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = mae_loss(outputs["pred"], outputs["target"], outputs["mask"], self.cfg.norm_pix_loss)
        return loss, {}
