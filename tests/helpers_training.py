"""Shared training-test settings: the tiny models every multi-rank test trains."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kiln.training.objectives.clip import clip_loss

__all__ = ["MICRO_MODEL", "TINY_MODEL", "clip_loss_of", "tiny_flavor"]

#: A CLIP small enough for 2-rank DeepSpeed runs on 2 CPU cores in seconds.
TINY_MODEL: dict[str, Any] = {
    "flavor": "clip-tiny",
    "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
    "text": {"width": 32, "layers": 1, "heads": 2, "context_length": 16},
    "embed_dim": 16,
}

#: Smaller still, for single-step gradient comparisons between processes.
MICRO_MODEL: dict[str, Any] = {
    **TINY_MODEL,
    "vision": {**TINY_MODEL["vision"], "width": 16},
    "text": {**TINY_MODEL["text"], "width": 16, "context_length": 12},
}


def tiny_flavor(arch: str) -> dict[str, Any]:
    """TINY_MODEL's sizes in family `arch` (clip, siglip, coca, mae)."""
    if arch == "mae":
        return {
            "flavor": "mae-tiny",
            "vision": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "heads": 2},
            "pixel_decoder": {"width": 32, "layers": 1, "heads": 2},
            "embed_dim": 16,
        }
    model = {**TINY_MODEL, "flavor": f"{arch}-tiny"}
    if arch == "coca":
        model["decoder"] = {"width": 32, "layers": 1, "heads": 2, "pooler_queries": 4}
    return model


def clip_loss_of(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`clip_loss` of a CLIP/CoCa forward's outputs."""
    return clip_loss(outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"])
