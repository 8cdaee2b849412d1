"""Vision Transformer image tower.

Patches are embedded by a linear layer on flattened ``p x p x 3`` patches (the same map as
CLIP's stride-p convolution, without needing a conv module), a learned class token is
prepended, learned positional embeddings added, then LayerNorm, pre-LN transformer blocks
and a final LayerNorm. With an `embed_dim`, the class token is projected into the shared
embedding space (CLIP, SigLIP); without, the tower only gives tokens (CoCa pools them
itself, MAE encodes visible patches only) and owns no projection it would leave unused.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.models.config import ViTConfig
from kiln.models.layers import Linear, Transformer

__all__ = ["VisionTransformer"]


class VisionTransformer(nn.Module):
    """``images [B, 3, S, S] -> features [B, embed_dim]`` (not normalized), or tokens."""

    def __init__(self, cfg: ViTConfig, embed_dim: int | None):
        super().__init__()
        width = cfg.width
        self.image_size = cfg.image_size
        self.patch_size = cfg.patch_size
        self.grid = cfg.grid
        scale = width**-0.5
        self.patch_embed = Linear(3 * cfg.patch_size**2, width, std=scale, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_width)
        self.ln_post = nn.LayerNorm(width)
        self.proj = (
            Linear(width, embed_dim, std=scale, bias=False) if embed_dim is not None else None
        )

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S] -> [B, (S/p)^2, 3*p*p]``, patches in row-major order."""
        b, c, h, w = images.shape
        if c != 3 or h != self.image_size or w != self.image_size:
            raise ValueError(
                f"images have shape {tuple(images.shape)}, expected [B, 3, {self.image_size}, "
                f"{self.image_size}]: resize with kiln.models.preprocess.preprocess_image "
                f"(image_size={self.image_size})"
            )
        p, g = self.patch_size, self.grid
        x = images.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, g * g, c * p * p)

    def embed(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Token sequence ``[B, 1 + n, width]`` before the blocks: class token + patches.

        `keep` (``[B, n]`` patch indices) selects the patches to embed (MAE's visible set).
        Reads this module's own parameters: call it only from `forward`.
        """
        # Inputs come from the loader in fp32; follow the tower's dtype (bf16 under DeepSpeed).
        x = self.patch_embed(self.patchify(images.to(self.class_embedding.dtype)))
        pos = self.positional_embedding.to(x.dtype)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        if keep is None:
            return torch.cat([cls, x], dim=1) + pos
        x = x + pos[1:]
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([cls + pos[:1], x], dim=1)

    def forward(
        self, images: torch.Tensor, keep: torch.Tensor | None = None, *, tokens: bool = False
    ) -> torch.Tensor:
        """The projected class token ``[B, embed_dim]``; or, with ``tokens=True`` (always
        when the tower has no projection), every output token after the final LayerNorm,
        ``[B, 1 + n, width]``. `keep` embeds only those patches (see `embed`).

        One entry point on purpose: ZeRO-3 gathers a module's own parameters (class and
        positional embeddings) around its ``forward``, so other towers call this one.
        """
        x = self.ln_pre(self.embed(images, keep))
        if tokens or self.proj is None:
            out: torch.Tensor = self.ln_post(self.transformer(x, causal=False))
            return out
        # Only the class token is read out: the last block computes it alone.
        cls = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        pooled = self.transformer(x, causal=False, rows=cls)[:, 0]
        result: torch.Tensor = self.proj(self.ln_post(pooled))
        return result
