"""CLIP: a ViT image tower and a causal text tower mapped into one normalized space.

The model is plain torch and knows nothing of DeepSpeed: `kiln.training.engine` wraps it.
Every parameter is registered in ``__init__`` (none created lazily) and read only in the
forward of the module that owns it, so ZeRO-3 can partition and gather them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kiln.training.config import ModelConfig
from kiln.training.models.text import TextTransformer
from kiln.training.models.vit import VisionTransformer
from kiln.training.tokenizer import VOCAB_SIZE

__all__ = ["CLIP", "MAX_LOGIT_SCALE", "build_model"]

#: The temperature ``exp(logit_scale)`` is clamped to at most this, as in CLIP.
MAX_LOGIT_SCALE = 100.0


class CLIP(nn.Module):
    """``encode_image``/``encode_text`` give L2-normalized ``[B, embed_dim]`` embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg.model_copy()
        self.visual = VisionTransformer(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            width=cfg.vision_width,
            layers=cfg.vision_layers,
            heads=cfg.vision_heads,
            embed_dim=cfg.embed_dim,
        )
        self.text = TextTransformer(
            vocab_size=VOCAB_SIZE,
            context_length=cfg.context_length,
            width=cfg.text_width,
            layers=cfg.text_layers,
            heads=cfg.text_heads,
            embed_dim=cfg.embed_dim,
        )
        # Shape [1] rather than a 0-dim scalar: DeepSpeed's zero.Init cannot partition 0-dim
        # parameters (it views each one as bytes to broadcast it).
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, 3, S, S]`` (normalized pixels) -> unit-norm ``[B, embed_dim]``."""
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, L]`` from `kiln.training.tokenizer.tokenize` -> unit-norm ``[B, D]``."""
        return F.normalize(self.text(tokens), dim=-1)

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image embeddings, text embeddings, exp(logit_scale) clamped to <= 100)``."""
        scale = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE).reshape(())
        return self.encode_image(images), self.encode_text(tokens), scale


def build_model(cfg: ModelConfig) -> CLIP:
    """The model `cfg` describes, initialized from torch's global RNG (seed it first)."""
    if cfg.arch != "clip":  # pragma: no cover - ModelConfig only admits "clip" today
        raise ValueError(f"model.arch={cfg.arch!r} is not supported: use 'clip'")
    if cfg.init_logit_scale > math.log(MAX_LOGIT_SCALE):
        raise ValueError(
            f"model.init_logit_scale={cfg.init_logit_scale} exceeds log({MAX_LOGIT_SCALE:g}) "
            f"= {math.log(MAX_LOGIT_SCALE):.4f}, where the temperature is clamped: lower it"
        )
    return CLIP(cfg)
