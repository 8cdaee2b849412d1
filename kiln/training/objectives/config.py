"""Typed configs of the objectives: the recipe's ``objective:`` section.

One class per objective, told apart by ``name``; with no ``objective:`` section a run
uses the objective of its model's family (``model.arch``). Kept apart from the objective
modules so reading a recipe does not import torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from kiln.contracts import StrictModel

__all__ = [
    "OBJECTIVE_ARCHS",
    "ClipObjectiveConfig",
    "CocaObjectiveConfig",
    "MaeObjectiveConfig",
    "ObjectiveConfig",
    "SiglipObjectiveConfig",
]


class ClipObjectiveConfig(StrictModel):
    """CLIP's symmetric InfoNCE over the global batch (embeddings all-gathered)."""

    name: Literal["clip"] = Field(default="clip", description="the objective")


class SiglipObjectiveConfig(StrictModel):
    """SigLIP's pairwise sigmoid loss with a learnable bias."""

    name: Literal["siglip"] = Field(default="siglip", description="the objective")
    exchange: Literal["ring", "all_gather"] = Field(
        default="ring",
        description="ring: the paper's chunked exchange of text embeddings between ranks "
        "(one chunk in flight); all_gather: gather every text embedding at once",
    )


class CocaObjectiveConfig(StrictModel):
    """CoCa: contrastive loss + captioning (next-token cross-entropy) loss."""

    name: Literal["coca"] = Field(default="coca", description="the objective")
    contrastive_weight: float = Field(
        default=1.0, ge=0, description="weight of the contrastive loss in the sum"
    )
    caption_weight: float = Field(
        default=2.0, ge=0, description="weight of the captioning loss (the paper's 2.0)"
    )


class MaeObjectiveConfig(StrictModel):
    """MAE: MSE on the masked patches (mask share: ``model.pixel_decoder.mask_ratio``)."""

    name: Literal["mae"] = Field(default="mae", description="the objective")
    norm_pix_loss: bool = Field(
        default=True, description="normalize each target patch by its own mean and std"
    )


ObjectiveConfig = Annotated[
    ClipObjectiveConfig | SiglipObjectiveConfig | CocaObjectiveConfig | MaeObjectiveConfig,
    Field(discriminator="name"),
]

#: Objective name -> the model families (``model.arch``) whose outputs it reads.
OBJECTIVE_ARCHS: dict[str, tuple[str, ...]] = {
    "clip": ("clip",),
    "siglip": ("siglip",),
    "coca": ("coca",),
    "mae": ("mae",),
}
