"""Plain-torch models kiln trains: `build_model(ModelConfig) -> CLIP`."""

from __future__ import annotations

from kiln.training.models.clip import CLIP, MAX_LOGIT_SCALE, build_model
from kiln.training.models.text import TextTransformer
from kiln.training.models.vit import VisionTransformer

__all__ = ["CLIP", "MAX_LOGIT_SCALE", "TextTransformer", "VisionTransformer", "build_model"]
