"""Vision Transformer image tower of kiln's CLIP.

Patches are embedded by a linear layer on flattened ``p x p x 3`` patches (the same map as
CLIP's stride-p convolution, without needing a conv module), a learned class token is
prepended, learned positional embeddings added, then LayerNorm, pre-LN transformer blocks,
LayerNorm on the class token and a linear projection into the shared embedding space.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.training.models.layers import Linear, Transformer

__all__ = ["VisionTransformer"]


class VisionTransformer(nn.Module):
    """``images [B, 3, S, S] -> features [B, embed_dim]`` (not normalized)."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        embed_dim: int,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} is not a multiple of patch_size={patch_size}"
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        scale = width**-0.5
        self.patch_embed = Linear(3 * patch_size * patch_size, width, std=scale, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = Linear(width, embed_dim, std=scale, bias=False)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S] -> [B, (S/p)^2, 3*p*p]``, patches in row-major order."""
        b, c, h, w = images.shape
        if c != 3 or h != self.image_size or w != self.image_size:
            raise ValueError(
                f"images have shape {tuple(images.shape)}, expected [B, 3, {self.image_size}, "
                f"{self.image_size}]: resize with kiln.training.transforms.image_to_tensor "
                f"(image_size={self.image_size})"
            )
        p, g = self.patch_size, self.grid
        x = images.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, g * g, c * p * p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Inputs come from the loader in fp32; follow the tower's dtype (bf16 under DeepSpeed).
        x = self.patch_embed(self.patchify(images.to(self.class_embedding.dtype)))
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x), causal=False)
        result: torch.Tensor = self.proj(self.ln_post(x[:, 0]))
        return result
