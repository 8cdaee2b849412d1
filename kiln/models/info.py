"""`kiln model info FLAVOR`: parameter counts per tower and FLOPs per sample.

FLOPs are counted analytically from the config (2 per multiply-add of every matrix
product, attention scores and weighted sums included; norms, softmax and activations
left out, as is usual). ``forward`` is one sample through the whole model as training
runs it (MAE: encoder on the visible patches only); ``train`` is 3x forward (backward
costs twice the forward), the figure MFU is computed from.
"""

from __future__ import annotations

from typing import Any

from kiln.models.config import ModelConfig

__all__ = ["flops_per_sample", "format_model_info", "model_info"]


def _block(n: int, width: int, mlp: int) -> int:
    """Multiply-adds of one pre-LN self-attention block over `n` tokens."""
    return n * (4 * width * width + 2 * width * mlp) + 2 * n * n * width


def _cross(n: int, m: int, width: int, kv: int) -> int:
    """Multiply-adds of cross-attention of `n` queries over `m` context tokens."""
    return n * 2 * width * width + m * 2 * kv * width + 2 * n * m * width


def flops_per_sample(cfg: ModelConfig) -> dict[str, int]:
    """Forward FLOPs per sample by part (``vision``, ``text``, ``decoder``), ``forward``,
    ``train``."""
    v = cfg.vision
    patches = v.grid**2
    seen = patches
    if cfg.pixel_decoder is not None:
        seen = max(1, round(patches * (1 - cfg.pixel_decoder.mask_ratio)))
    macs: dict[str, int] = {}
    vision = seen * 3 * v.patch_size**2 * v.width + v.layers * _block(
        seen + 1, v.width, v.mlp_width
    )
    if cfg.arch in ("clip", "siglip"):
        vision += v.width * cfg.embed_dim
    macs["vision"] = vision
    if cfg.text is not None:
        t = cfg.text
        macs["text"] = t.layers * _block(t.context_length, t.width, t.mlp_width)
        macs["text"] += t.width * cfg.embed_dim
    if cfg.decoder is not None and cfg.text is not None:
        d, n = cfg.decoder, cfg.text.context_length
        q = d.pooler_queries + 1
        dec = _cross(q, patches + 1, d.width, v.width) + d.width * cfg.embed_dim
        dec += d.layers * (
            _block(n, d.width, d.mlp_width)
            + _cross(n, q - 1, d.width, d.width)
            + n * 2 * d.width * d.mlp_width
        )
        dec += n * d.width * cfg.text.vocab_size
        macs["decoder"] = dec
    if cfg.pixel_decoder is not None:
        pd = cfg.pixel_decoder
        dec = (seen + 1) * v.width * pd.width
        dec += pd.layers * _block(patches + 1, pd.width, pd.mlp_width)
        dec += patches * pd.width * 3 * v.patch_size**2
        macs["decoder"] = dec
    flops = {k: 2 * m for k, m in macs.items()}
    flops["forward"] = sum(flops.values())
    flops["train"] = 3 * flops["forward"]
    return flops


def model_info(cfg: ModelConfig) -> dict[str, Any]:
    """Flavor, family, parameters per part and total, FLOPs per sample, tokenizer."""
    from kiln.models.build import count_parameters
    from kiln.models.flavors import PUBLISHED_PARAMS

    info: dict[str, Any] = {
        "flavor": cfg.flavor,
        "arch": cfg.arch,
        "image_size": cfg.vision.image_size,
        "tokenizer": cfg.text.tokenizer if cfg.text is not None else None,
        "params": count_parameters(cfg),
        "flops_per_sample": flops_per_sample(cfg),
    }
    if cfg.flavor in PUBLISHED_PARAMS:
        info["published_params_m"] = PUBLISHED_PARAMS[cfg.flavor]
    return info


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_model_info(info: dict[str, Any]) -> str:
    """The table `kiln model info` prints."""
    lines = [
        f"flavor      {info['flavor']} ({info['arch']}, {info['image_size']}px"
        + (f", tokenizer {info['tokenizer']})" if info["tokenizer"] else ")"),
        "parameters",
    ]
    params = info["params"]
    for name, count in params.items():
        if name != "total" and (count or name != "other"):
            lines.append(f"  {name:<16} {count:>15,}  {_human(count)}")
    lines.append(f"  {'total':<16} {params['total']:>15,}  {_human(params['total'])}")
    if "published_params_m" in info:
        lines.append(f"  {'published':<16} {'':>15}  {info['published_params_m']:.2f}M (OpenCLIP)")
    lines.append("FLOPs per sample")
    for name, value in info["flops_per_sample"].items():
        lines.append(f"  {name:<16} {_human(value, 'FLOP'):>15}")
    return "\n".join(lines)
