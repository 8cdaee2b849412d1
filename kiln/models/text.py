"""Causal text transformer tower over token ids (kiln's byte tokenizer or CLIP's BPE).

Token + learned positional embeddings, pre-LN blocks with a causal mask, a final LayerNorm,
then the features at each row's end-of-text position (its last non-pad token: the tokenizer
always ends a row with EOS, then pads with ``PAD_ID``) projected into the shared space.
Because attention is causal and padding comes after EOS, the padding never influences the
features that are read out. The forward also returns every position's features, which
CoCa's decoder reads.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.models.config import TextConfig
from kiln.models.layers import Embedding, Linear, Packing, Transformer
from kiln.models.tokenizer import PAD_ID

__all__ = ["PACK_MIN_PADDING", "TextTransformer", "cut_captions", "worth_packing"]

#: Pack a batch's tokens when at least this share of its positions is padding: below it,
#: the copies in and out of each attention cost about what the padding would.
PACK_MIN_PADDING = 0.05


def worth_packing(keep: torch.Tensor) -> bool:
    """Whether the text tower packs a batch whose kept positions are `keep` (``[B, n]``)."""
    return bool(keep.numel()) and 1 - int(keep.sum()) / keep.numel() >= PACK_MIN_PADDING


def cut_captions(tokens: torch.Tensor) -> tuple[torch.Tensor, Packing | None]:
    """`tokens` ``[B, L]`` cut after the batch's last end-of-text token, and the `Packing`
    of each row's tokens (through its end-of-text) when enough of the rest is padding.

    What a causal tower needs when nothing after a caption's end-of-text is read: those
    positions can change no earlier one. An empty batch is returned as it is.
    """
    if not tokens.shape[0]:
        return tokens, None
    lengths = (tokens != PAD_ID).sum(dim=1).clamp(min=1)  # BOS..EOS; EOS is the last non-pad
    n = int(lengths.max())
    keep = torch.arange(n, device=tokens.device) < lengths[:, None]
    return tokens[:, :n], Packing(keep) if worth_packing(keep) else None


class TextTransformer(nn.Module):
    """``tokens [B, L] (L <= context_length) -> (features [B, embed_dim], [B, L, width])``."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        width = cfg.width
        self.context_length = cfg.context_length
        self.token_embedding = Embedding(cfg.vocab_size, width, std=0.02)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.context_length, width))
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_width)
        self.ln_final = nn.LayerNorm(width)
        self.proj = Linear(width, embed_dim, std=width**-0.5, bias=False)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        pooled_only: bool = False,
        packing: Packing | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled features [B, embed_dim], per-position features [B, L, width])``.

        Both from one entry point: ZeRO-3 gathers this module's own parameters (the
        positional embedding) around its ``forward``, so CoCa's decoder reads the
        per-position features from here rather than from a second method.

        ``pooled_only=True`` (CLIP, SigLIP: only the pooled features are used) computes
        just what they need: no position after a row's end-of-text token (causal
        attention: they never reach an earlier position), and the last block runs
        attention and MLP for each row's end-of-text token only; the second value is then
        that token's features, ``[B, 1, width]``. The positions after the batch's last
        end-of-text token are cut off (`cut_captions`); when a batch's captions differ in
        length the rest are packed away too (`kiln.models.layers.Packing`), where their
        padding would be a third or more of the tower's work on web alt-texts. The pooled
        features are those of the full computation up to float rounding.

        `packing` (of `tokens`, from `cut_captions`: CoCa, whose decoder reads every
        position) runs the tower on the packed tokens; the second value is then packed,
        ``[R, width]`` (`kiln.models.layers.Packing`).
        """
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"tokens have shape {tuple(tokens.shape)}, expected [B, L] with "
                f"L <= context_length={self.context_length}: tokenize with "
                f"kiln.models.tokenizer.tokenize(texts, {self.context_length})"
            )
        if packing is not None and (
            pooled_only or (packing.batch, packing.length) != tuple(tokens.shape)
        ):
            raise ValueError(
                f"packing of a [{packing.batch}, {packing.length}] batch given with tokens "
                f"{tuple(tokens.shape)}{' and pooled_only' if pooled_only else ''}: pass "
                "the tokens and packing cut_captions returns, without pooled_only"
            )
        # Last non-pad position = EOS (BOS guarantees at least one non-pad token).
        eos = ((tokens != PAD_ID).sum(dim=1) - 1).clamp(min=0)
        if pooled_only:
            tokens, packing = cut_captions(tokens)
        n = tokens.shape[1]
        x = self.token_embedding(tokens)
        x = x + self.positional_embedding[:n].to(x.dtype)
        if packing is not None:
            x = packing.pack(x)
        rows = eos if pooled_only else None
        x = self.ln_final(self.transformer(x, causal=True, rows=rows, packing=packing))
        if pooled_only:
            at_eos = x[:, 0]
        elif packing is not None:
            at_eos = x[packing.ends]
        else:
            at_eos = x[torch.arange(x.shape[0], device=x.device), eos]
        pooled: torch.Tensor = self.proj(at_eos)
        return pooled, x
