"""Causal text transformer tower of kiln's CLIP, over byte-level token ids.

Token + learned positional embeddings, pre-LN blocks with a causal mask, a final LayerNorm,
then the features at each row's end-of-text position (its last non-pad token: the tokenizer
always ends a row with EOS, then pads with ``PAD_ID``) projected into the shared space.
Because attention is causal and padding comes after EOS, the padding never influences the
features that are read out.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.training.models.layers import Embedding, Linear, Transformer
from kiln.training.tokenizer import PAD_ID

__all__ = ["TextTransformer"]


class TextTransformer(nn.Module):
    """``tokens [B, L] (L <= context_length) -> features [B, embed_dim]`` (not normalized)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        context_length: int,
        width: int,
        layers: int,
        heads: int,
        embed_dim: int,
    ):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = Embedding(vocab_size, width, std=0.02)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context_length, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.proj = Linear(width, embed_dim, std=width**-0.5, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"tokens have shape {tuple(tokens.shape)}, expected [B, L] with "
                f"L <= context_length={self.context_length}: tokenize with "
                f"kiln.training.tokenizer.tokenize(texts, {self.context_length})"
            )
        n = tokens.shape[1]
        x = self.token_embedding(tokens)
        x = x + self.positional_embedding[:n].to(x.dtype)
        x = self.ln_final(self.transformer(x, causal=True))
        # Last non-pad position = EOS (BOS guarantees at least one non-pad token).
        eos = ((tokens != PAD_ID).sum(dim=1) - 1).clamp(min=0)
        result: torch.Tensor = self.proj(x[torch.arange(x.shape[0], device=x.device), eos])
        return result
