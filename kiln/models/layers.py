"""Transformer building blocks shared by every tower.

Every layer initializes its own parameters inside its own ``__init__`` with an explicit
standard deviation, instead of a parent re-initializing children afterwards. That keeps two
promises: initialization is a pure function of torch's RNG and the construction order
(the caller seeds), and the model can be built under DeepSpeed's ``zero.Init`` (or on the
``meta`` device to count parameters), which partitions each module's parameters as soon as
its ``__init__`` returns (a parent touching ``child.weight.data`` later would see an empty
shard). Parameters are only read inside the forward of the module that owns them, which is
what ZeRO-3's gather hooks expect. Attention runs through torch's
``scaled_dot_product_attention`` (fused kernels where the device has them).

No dropout anywhere: CPU fp32 training is then bitwise reproducible.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kiln.models.gemm import linear

__all__ = [
    "MLP",
    "Attention",
    "AttentionalPooler",
    "CrossAttention",
    "CrossAttentionBlock",
    "Embedding",
    "Linear",
    "Packing",
    "Transformer",
    "TransformerBlock",
    "packed_rows",
    "run_block",
    "set_activation_checkpointing",
]


class Linear(nn.Module):
    """``y = x W^T + b`` with ``W ~ N(0, std^2)`` and ``b = 0``; computed by `kiln.models.gemm`
    (oneDNN for CPU fp32, torch's own kernel elsewhere)."""

    def __init__(self, in_features: int, out_features: int, *, std: float, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(self.weight, std=std)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """Lookup table with ``N(0, std^2)`` rows."""

    def __init__(self, num_embeddings: int, dim: int, *, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))
        nn.init.normal_(self.weight, std=std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, w = x.shape
    return x.reshape(b, n, heads, w // heads).transpose(1, 2)


def _rows(
    x: torch.Tensor, index: torch.Tensor, *, zero_row: bool, rows: int | None = None
) -> torch.Tensor:
    """``x[index]`` along dim 0; with `zero_row`, index ``len(x)`` reads a row of zeros;
    with `rows` (at least ``len(index)``), followed by rows of zeros up to that many."""
    if zero_row:
        x = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])
    if rows is None or rows == len(index):
        return x.index_select(0, index)
    out = x.new_empty((rows, *x.shape[1:]))
    torch.index_select(x, 0, index, out=out[: len(index)])
    out[len(index) :].zero_()
    return out


class _MoveRows(torch.autograd.Function):
    """`_rows` forward, and the inverse map's `_rows` as its backward.

    Packing and unpacking are permutations with zeros, so each direction's gradient is a
    gather too. Autograd's own backward for these (``index_add`` / ``index_copy`` into
    zeros) is 3-5x slower on CPU than a gather, and at one pack and one unpack per block it
    would cost a tenth of a text tower's step.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        index: torch.Tensor,
        inverse: torch.Tensor,
        zero_row: bool,
        rows: int,
    ) -> torch.Tensor:
        # `rows`: the packed side's row count; the direction that gathers into the packed
        # side (pack's forward, unpack's backward) pads it with zero rows to that many
        ctx.inverse, ctx.zero_row, ctx.rows = inverse, zero_row, rows
        return _rows(x, index, zero_row=zero_row, rows=None if zero_row else rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows = ctx.rows if ctx.zero_row else None
        moved = _rows(grad, ctx.inverse, zero_row=not ctx.zero_row, rows=rows)
        return moved, None, None, None, None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def packed_rows(tokens: int) -> int:
    """`tokens` rounded up to a multiple of 8 and of ``2**(bit_length - 6)`` (64 for
    2,048-4,095 tokens): 32 sizes per doubling, at most 1/32 more rows from 256 up."""
    return _round_up(tokens, max(8, 1 << max(tokens.bit_length() - 6, 0)))


class Packing:
    """Where the tokens of a padded batch ``[B, n, ...]`` sit once its padding is dropped.

    `keep` (``[B, n]`` bool) marks the positions that hold tokens. `pack` keeps those rows,
    row after row (``T = keep.sum()`` of them, rounded up to ``R`` below), and `unpack` puts
    them back in place with zeros at the padding. Every per-token layer (LayerNorm, the
    linear maps, GELU) then runs on ``R`` rows instead of ``B * n``; only attention, which
    mixes the positions of one row, runs on the padded batch (`Attention` unpacks its q, k,
    v and packs its output). On captions of mixed length that is a third of a text tower's
    work or more.

    A packed tensor has ``R >= T`` rows: the tokens, then rows of zeros that `unpack`
    drops (no gradient reaches them). ``R`` is ``T`` rounded up to a multiple of
    `multiple`, by default `packed_rows`'s few sizes. Every batch of captions has a token
    count of its own, so unrounded, each step's per-token tensors have sizes no earlier
    step had and the host allocator keeps growing its heap for them: in a CPU run, memory
    grew 25-40 MB a step, with page faults in every step's large temporaries. Rounded, sizes
    recur and the heap stops growing.
    """

    def __init__(self, keep: torch.Tensor, *, multiple: int | None = None) -> None:
        if multiple is not None and multiple < 1:
            raise ValueError(f"Packing: multiple={multiple} must be at least 1")
        self.batch, self.length = keep.shape
        flat = keep.reshape(-1)
        #: packed row -> padded position, and padded position -> packed row (``R``: padding)
        self.index = flat.nonzero().squeeze(1)
        #: kept positions ``T``, and rows of a packed tensor ``R`` (``T`` rounded up)
        self.tokens = int(self.index.numel())
        if multiple is None:
            self.rows = packed_rows(self.tokens)
        else:
            self.rows = _round_up(self.tokens, multiple)
        self.inverse = torch.where(flat, flat.cumsum(0) - 1, self.rows)
        #: packed row of each batch row's last kept position (a caption's end-of-text)
        self.ends = keep.sum(dim=1).cumsum(0) - 1

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, n, ...] -> [R, ...]``: the ``T`` kept positions, then zeros."""
        flat = x.reshape(self.batch * self.length, *x.shape[2:])
        out: torch.Tensor = _MoveRows.apply(flat, self.index, self.inverse, False, self.rows)
        return out

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[R, ...] -> [B, n, ...]``, zeros at the padding."""
        if x.shape[0] != self.rows:
            raise ValueError(
                f"Packing.unpack: {x.shape[0]} rows given, this packing has {self.rows}"
            )
        full: torch.Tensor = _MoveRows.apply(x, self.inverse, self.index, True, self.rows)
        return full.reshape(self.batch, self.length, *x.shape[1:])


class Attention(nn.Module):
    """Multi-head self-attention (fused qkv projection, torch's scaled-dot-product kernel)."""

    def __init__(self, width: int, heads: int, *, std: float, out_std: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width={width} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = Linear(width, 3 * width, std=std)
        self.out = Linear(width, width, std=out_std)

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool,
        rows: torch.Tensor | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """``[B, n, width] -> [B, n, width]``; with `rows` (``[B]`` positions), only the
        output at row b's position ``rows[b]``, ``[B, 1, width]``: keys and values of every
        position, one query per row (causal: it sees positions up to its own). With
        `packing`, `x` and the result are the packed tokens, ``[R, width]``."""
        qkv = self.qkv(x)
        if packing is not None:
            if rows is not None:
                raise ValueError("Attention: rows and packing are exclusive; unpack x first")
            qkv = packing.unpack(qkv)
        b, n, w = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        # unbind, not qkv[0], qkv[1], qkv[2]: its backward stacks the three gradients into
        # one tensor, where three selects would each fill a zero tensor of all three and
        # sum them (the same gradients; 3% of a ViT-S/32 step)
        qkv = qkv.reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if rows is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            y = y.transpose(1, 2).reshape(b, n, w)
            return self.out(y if packing is None else packing.pack(y))
        q = q[torch.arange(b, device=x.device), :, rows][:, :, None]  # [B, heads, 1, d]
        mask = None
        if causal:
            mask = (torch.arange(n, device=x.device) <= rows[:, None])[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, 1, w))


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``[B, n, width]`` over a context ``[B, m, kv_width]``."""

    def __init__(self, width: int, heads: int, kv_width: int, *, std: float, out_std: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width={width} is not divisible by heads={heads}")
        self.heads = heads
        self.q = Linear(width, width, std=std)
        self.kv = Linear(kv_width, 2 * width, std=kv_width**-0.5)
        self.out = Linear(width, width, std=out_std)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, packing: Packing | None = None
    ) -> torch.Tensor:
        """``[B, n, width] -> [B, n, width]``; with `packing`, `x` and the result are the
        packed queries, ``[R, width]``."""
        k, v = self.kv(context).chunk(2, dim=-1)
        q = self.q(x)
        if packing is not None:
            q = packing.unpack(q)
        b, n, w = q.shape
        y = F.scaled_dot_product_attention(
            _split_heads(q, self.heads),
            _split_heads(k.contiguous(), self.heads),
            _split_heads(v.contiguous(), self.heads),
        )
        y = y.transpose(1, 2).reshape(b, n, w)
        return self.out(y if packing is None else packing.pack(y))


class MLP(nn.Module):
    """Two linear layers with a GELU between (hidden width `hidden`, 4x width in CLIP)."""

    def __init__(self, width: int, *, std: float, out_std: float, hidden: int | None = None):
        super().__init__()
        hidden = 4 * width if hidden is None else hidden
        self.fc = Linear(width, hidden, std=std)
        self.proj = Linear(hidden, width, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


def _stds(width: int, layers: int) -> tuple[float, float, float]:
    # CLIP's scheme: residual-branch outputs shrink with depth so the stream stays O(1).
    return width**-0.5, width**-0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5


class TransformerBlock(nn.Module):
    """Pre-LayerNorm residual block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, width: int, heads: int, layers: int, mlp_width: int | None = None):
        super().__init__()
        attn_std, out_std, fc_std = _stds(width, layers)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, std=attn_std, out_std=out_std)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, std=fc_std, out_std=out_std, hidden=mlp_width)

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool,
        rows: torch.Tensor | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """``[B, n, width] -> [B, n, width]``; with `rows` (``[B]`` positions), only the
        output at those positions, ``[B, 1, width]``: what a tower that reads one token
        of its last block needs (that token's attention, MLP and residual; the others'
        keys and values). The same values as the full block's row, up to float rounding.
        With `packing` (not with `rows`), `x` and the result are packed, ``[R, width]``."""
        if rows is None:
            x = x + self.attn(self.ln_1(x), causal=causal, packing=packing)
            return x + self.mlp(self.ln_2(x))
        kept = x[torch.arange(x.shape[0], device=x.device), rows][:, None]
        kept = kept + self.attn(self.ln_1(x), causal=causal, rows=rows)
        return kept + self.mlp(self.ln_2(kept))


class CrossAttentionBlock(nn.Module):
    """``x + xattn(ln(x), ln(context))`` then ``x + mlp(ln(x))`` (CoCa's decoder layer half)."""

    def __init__(
        self, width: int, heads: int, layers: int, kv_width: int, mlp_width: int | None = None
    ):
        super().__init__()
        attn_std, out_std, fc_std = _stds(width, layers)
        self.ln_1 = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(kv_width)
        self.attn = CrossAttention(width, heads, kv_width, std=attn_std, out_std=out_std)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, std=fc_std, out_std=out_std, hidden=mlp_width)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, packing: Packing | None = None
    ) -> torch.Tensor:
        """``[B, n, width] -> [B, n, width]``, or packed ``[R, width]`` with `packing`."""
        x = x + self.attn(self.ln_1(x), self.ln_kv(context), packing)
        return x + self.mlp(self.ln_2(x))


def run_block(block: nn.Module, *args: torch.Tensor, recompute: bool, **kwargs: Any) -> Any:
    """`block(*args, **kwargs)`; with `recompute` (and gradients on), its activations are
    not kept for the backward pass but recomputed there. torch's reentrant checkpoint:
    the recompute is a full call of the block, module hooks included, which is what
    ZeRO-3's parameter gathers hang on (the non-reentrant one reruns the forward without
    them and meets empty parameter shards)."""
    if recompute and torch.is_grad_enabled():
        call = functools.partial(block, **kwargs) if kwargs else block
        return checkpoint(call, *args, use_reentrant=True)
    return block(*args, **kwargs)


def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn per-block activation checkpointing on or off in every block stack of `model`
    (the modules with a `recompute_blocks` switch)."""
    for module in model.modules():
        if hasattr(module, "recompute_blocks"):
            object.__setattr__(module, "recompute_blocks", on)  # a plain flag, not a submodule


class Transformer(nn.Module):
    """A stack of pre-LN blocks; `causal` masks attention to earlier positions only."""

    recompute_blocks = False

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, layers, mlp_width) for _ in range(layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool = False,
        rows: torch.Tensor | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """``[B, n, width] -> [B, n, width]``; with `rows` (``[B]`` positions), the output at
        those positions only, ``[B, 1, width]``: the last block then computes attention
        and MLP for that one token per row (a CLIP tower pools one token).

        With `packing`, `x` is the packed tokens ``[R, width]`` (see `Packing`), and so is
        the result, unless `rows` is given: the last block then runs on the padded batch
        (its MLP sees one token per row anyway) and returns ``[B, 1, width]``."""
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            kwargs: dict[str, Any] = {}
            if rows is not None and i == last:
                if packing is not None:
                    x, packing = packing.unpack(x), None
                kwargs["rows"] = rows
            elif packing is not None:
                kwargs["packing"] = packing
            x = run_block(block, x, causal=causal, recompute=self.recompute_blocks, **kwargs)
        return x


class AttentionalPooler(nn.Module):
    """`queries` learned tokens cross-attending to a sequence: ``[B, m, kv] -> [B, q, width]``.

    CoCa's pooler (as OpenCLIP's ``AttentionalPooler``): LayerNorm on the context and the
    queries, one multi-head cross-attention, no MLP.
    """

    def __init__(self, width: int, kv_width: int, queries: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(width**-0.5 * torch.randn(queries, width))
        self.ln_q = nn.LayerNorm(width)
        self.ln_k = nn.LayerNorm(kv_width)
        self.attn = CrossAttention(width, heads, kv_width, std=width**-0.5, out_std=width**-0.5)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        q = self.ln_q(self.query.to(context.dtype)).expand(context.shape[0], -1, -1)
        out: torch.Tensor = self.attn(q, self.ln_k(context))
        return out
