"""CLIP and SigLIP: a ViT image tower and a causal text tower mapped into one space.

The two families share the towers; SigLIP adds a learnable logit bias (its sigmoid loss
needs one; initialized at -10 with the scale at log 10, as in the paper). The model is
plain torch and knows nothing of DeepSpeed: `kiln.training.engine` wraps it. Every
parameter is registered in ``__init__`` (none created lazily) and read only in the
forward of the module that owns it, so ZeRO-3 can partition and gather them.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kiln.models.config import MAX_LOGIT_SCALE, ModelConfig
from kiln.models.text import TextTransformer
from kiln.models.vit import VisionTransformer

__all__ = ["CLIP"]


class CLIP(nn.Module):
    """``encode_image``/``encode_text`` give L2-normalized ``[B, embed_dim]`` embeddings.

    ``forward(images, tokens)`` returns ``{"image_embeds", "text_embeds", "logit_scale"}``
    (the temperature ``exp(logit_scale)`` clamped to at most 100) plus ``"logit_bias"``
    for SigLIP.
    """

    #: Top-level modules per tower, for parameter counts (the rest: logit scale/bias).
    TOWERS: ClassVar[dict[str, tuple[str, ...]]] = {"vision": ("visual",), "text": ("text",)}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.text is None:
            raise ValueError(f"flavor {cfg.flavor!r} has no text tower: CLIP needs model.text")
        self.config = cfg.model_copy()
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        # Shape [1] rather than a 0-dim scalar: DeepSpeed's zero.Init cannot partition 0-dim
        # parameters (it views each one as bytes to broadcast it).
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.full((1,), float(cfg.init_logit_bias)))
            if cfg.arch == "siglip"
            else None
        )

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, 3, S, S]`` (normalized pixels) -> unit-norm ``[B, embed_dim]``."""
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, L]`` from `kiln.models.tokenizer.tokenize` -> unit-norm ``[B, D]``."""
        return F.normalize(self.text(tokens, pooled_only=True)[0], dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        scale = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE).reshape(())
        out = {
            "image_embeds": self.encode_image(images),
            "text_embeds": self.encode_text(tokens),
            "logit_scale": scale,
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.reshape(())
        return out
