"""Transformer building blocks shared by the image and text towers.

Every layer initializes its own parameters inside its own ``__init__`` with an explicit
standard deviation, instead of a parent re-initializing children afterwards. That keeps two
promises: initialization is a pure function of torch's RNG and the construction order
(the caller seeds), and the model can be built under DeepSpeed's ``zero.Init``, which
partitions each module's parameters as soon as its ``__init__`` returns (a parent touching
``child.weight.data`` later would see an empty shard). Parameters are only read inside the
forward of the module that owns them, which is what ZeRO-3's gather hooks expect.

No dropout anywhere: CPU fp32 training is then bitwise reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "Attention", "Embedding", "Linear", "Transformer", "TransformerBlock"]


class Linear(nn.Module):
    """``y = x W^T + b`` with ``W ~ N(0, std^2)`` and ``b = 0``."""

    def __init__(self, in_features: int, out_features: int, *, std: float, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(self.weight, std=std)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """Lookup table with ``N(0, std^2)`` rows."""

    def __init__(self, num_embeddings: int, dim: int, *, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))
        nn.init.normal_(self.weight, std=std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Attention(nn.Module):
    """Multi-head self-attention (fused qkv projection, torch's scaled-dot-product kernel)."""

    def __init__(self, width: int, heads: int, *, std: float, out_std: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width={width} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = Linear(width, 3 * width, std=std)
        self.out = Linear(width, width, std=out_std)

    def forward(self, x: torch.Tensor, *, causal: bool) -> torch.Tensor:
        b, n, w = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(b, n, w))


class MLP(nn.Module):
    """Two linear layers with a GELU between, 4x hidden width as in CLIP."""

    def __init__(self, width: int, *, std: float, out_std: float):
        super().__init__()
        self.fc = Linear(width, 4 * width, std=std)
        self.proj = Linear(4 * width, width, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm residual block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, width: int, heads: int, layers: int):
        super().__init__()
        # CLIP's scheme: residual-branch outputs shrink with depth so the stream stays O(1).
        attn_std = width**-0.5
        out_std = width**-0.5 * (2 * layers) ** -0.5
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, std=attn_std, out_std=out_std)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, std=(2 * width) ** -0.5, out_std=out_std)

    def forward(self, x: torch.Tensor, *, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of pre-LN blocks; `causal` masks attention to earlier positions only."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, layers) for _ in range(layers))

    def forward(self, x: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, causal=causal)
        return x
