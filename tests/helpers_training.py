"""Shared training-test settings: the tiny CLIP every multi-rank test trains."""

from __future__ import annotations

from typing import Any

__all__ = ["MICRO_MODEL", "TINY_MODEL"]

#: A CLIP small enough for 2-rank DeepSpeed runs on 2 CPU cores in seconds.
TINY_MODEL: dict[str, Any] = {
    "image_size": 16,
    "patch_size": 8,
    "vision_width": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "text_width": 32,
    "text_layers": 1,
    "text_heads": 2,
    "context_length": 16,
    "embed_dim": 16,
}

#: Smaller still, for single-step gradient comparisons between processes.
MICRO_MODEL: dict[str, Any] = {
    **TINY_MODEL,
    "vision_width": 16,
    "text_width": 16,
    "context_length": 12,
}
