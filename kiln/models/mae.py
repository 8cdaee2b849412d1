"""MAE: masked autoencoder pretraining of a ViT (He et al. 2022).

A share `mask_ratio` of each image's patches is hidden; the encoder (the ViT, with its
class token) sees only the visible ones; a light decoder gets the encoded visible tokens
back in place, a learned mask token at every hidden position and its own positional
embeddings, and predicts every patch's pixels. The loss (`kiln.training.objectives.mae`)
is the MSE on the hidden patches.

Masking is a pure function of a per-sample seed (the loader derives it from
``(seed, epoch, uid)``): the same sample in the same epoch is masked the same way on any
rank, worker or resume, and differently in the next epoch.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kiln.models.config import ModelConfig
from kiln.models.layers import Linear, Transformer
from kiln.models.vit import VisionTransformer

__all__ = ["MAE", "random_masking"]


def random_masking(
    seeds: torch.Tensor, num_patches: int, num_keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keep [B, num_keep], mask [B, N] 1.0 = hidden, restore [B, N])`` from seeds ``[B]``.

    Each row's patch order is a permutation drawn from a generator seeded by its seed;
    the first `num_keep` of that order are visible, sorted. `restore` puts the
    ``[visible..., hidden...]`` sequence back in patch order.
    """
    rows = []
    for seed in seeds.tolist():
        gen = torch.Generator().manual_seed(int(seed) % 2**63)
        rows.append(torch.randperm(num_patches, generator=gen))
    order = torch.stack(rows)
    keep = order[:, :num_keep].sort(dim=1).values
    hidden = order[:, num_keep:].sort(dim=1).values
    shuffled = torch.cat([keep, hidden], dim=1)
    restore = shuffled.argsort(dim=1)
    mask = torch.ones(len(order), num_patches)
    mask.scatter_(1, keep, 0.0)
    device = seeds.device
    return keep.to(device), mask.to(device), restore.to(device)


class MAE(nn.Module):
    """``forward(images, mask_seeds) -> {"pred", "target", "mask"}`` (per-patch pixels)."""

    #: Top-level modules and parameters per tower, for parameter counts.
    TOWERS: ClassVar[dict[str, tuple[str, ...]]] = {
        "vision": ("visual",),
        "decoder": (
            "decoder_embed",
            "mask_token",
            "decoder_pos",
            "decoder",
            "decoder_norm",
            "decoder_pred",
        ),
    }

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.pixel_decoder is None:
            raise ValueError(f"flavor {cfg.flavor!r}: MAE needs model.pixel_decoder")
        v, d = cfg.vision, cfg.pixel_decoder
        self.config = cfg.model_copy()
        self.num_patches = v.grid**2
        self.num_keep = max(1, round(self.num_patches * (1 - d.mask_ratio)))
        self.visual = VisionTransformer(v, None)
        self.decoder_embed = Linear(v.width, d.width, std=v.width**-0.5)
        self.mask_token = nn.Parameter(0.02 * torch.randn(d.width))
        self.decoder_pos = nn.Parameter(0.02 * torch.randn(self.num_patches + 1, d.width))
        self.decoder = Transformer(d.width, d.layers, d.heads, d.mlp_width)
        self.decoder_norm = nn.LayerNorm(d.width)
        self.decoder_pred = Linear(d.width, 3 * v.patch_size**2, std=d.width**-0.5)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm mean of the encoder's patch tokens on the whole image (for probes)."""
        tokens = self.visual(images, tokens=True)
        return F.normalize(tokens[:, 1:].mean(dim=1), dim=-1)

    def forward(self, images: torch.Tensor, mask_seeds: torch.Tensor) -> dict[str, torch.Tensor]:
        keep, mask, restore = random_masking(mask_seeds, self.num_patches, self.num_keep)
        encoded = self.visual(images, keep)
        x = self.decoder_embed(encoded)
        b, width = x.shape[0], x.shape[-1]
        hidden = self.mask_token.to(x.dtype).expand(b, self.num_patches - self.num_keep, width)
        patches = torch.cat([x[:, 1:], hidden], dim=1)
        patches = torch.gather(patches, 1, restore[..., None].expand(-1, -1, width))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos.to(x.dtype)
        pred = self.decoder_pred(self.decoder_norm(self.decoder(x)))[:, 1:]
        return {"pred": pred, "target": self.visual.patchify(images.float()), "mask": mask}
