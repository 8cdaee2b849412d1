"""Named model sizes ("flavors") as data: a name maps to the nested fields of a ModelConfig.

Image towers follow the standard ViT sizes (Ti/S/B/L/H/g; widths, depths, heads, MLP
ratios as in OpenCLIP's ``model_configs/*.json`` and timm), paired with OpenCLIP's text tower
for that size. Every size exists for each family:

- ``clip-vit-{size}``: OpenCLIP's ``ViT-{size}`` (same parameter count, see
  `PUBLISHED_PARAMS`); its text tower expects the 49,408-token CLIP BPE.
- ``siglip-vit-{size}``: the same towers plus SigLIP's learnable logit bias (kiln's SigLIP
  keeps CLIP's towers; OpenCLIP's ``ViT-*-SigLIP`` models differ in pooling and vocab).
- ``coca-vit-{size}``: the towers plus an attentional pooler (256 queries) and a multimodal
  decoder as wide and deep as the text tower (OpenCLIP's ``coca_ViT-*`` sizes).
- ``mae-vit-{size}``: the image tower plus MAE's decoder (512 wide, 8 deep, 16 heads).

``ti`` pairs with a 192-wide text tower (OpenCLIP has no ViT-Ti CLIP). ``clip-tiny``
(alias ``tiny``), ``siglip-tiny``, ``coca-tiny`` and ``mae-tiny`` are the quickstart's
2-layer, 32-pixel models over kiln's byte tokenizer, for tests and the CPU demo.

Adding a flavor is one entry in `FLAVORS` (or one size in `VIT_SIZES`).
"""

from __future__ import annotations

import copy
import difflib
import math
from typing import Any

__all__ = [
    "ALIASES",
    "FLAVORS",
    "PUBLISHED_PARAMS",
    "TEXT_SIZES",
    "VIT_SIZES",
    "flavor_fields",
    "flavor_names",
]

#: Standard ViT image towers: patch, width, layers, heads (head width 64; H: 80, g: 88).
VIT_SIZES: dict[str, dict[str, Any]] = {
    "ti-16": {"patch_size": 16, "width": 192, "layers": 12, "heads": 3},
    "s-16": {"patch_size": 16, "width": 384, "layers": 12, "heads": 6},
    "s-32": {"patch_size": 32, "width": 384, "layers": 12, "heads": 6},
    "b-16": {"patch_size": 16, "width": 768, "layers": 12, "heads": 12},
    "b-32": {"patch_size": 32, "width": 768, "layers": 12, "heads": 12},
    "l-14": {"patch_size": 14, "width": 1024, "layers": 24, "heads": 16},
    "h-14": {"patch_size": 14, "width": 1280, "layers": 32, "heads": 16},
    "g-14": {"patch_size": 14, "width": 1408, "layers": 40, "heads": 16, "mlp_ratio": 4.3637},
}

#: Text tower and shared embedding width per size class (OpenCLIP's ``text_cfg``, ``embed_dim``).
TEXT_SIZES: dict[str, dict[str, Any]] = {
    "ti": {"width": 192, "heads": 3, "layers": 12, "embed_dim": 192},
    "s": {"width": 384, "heads": 6, "layers": 12, "embed_dim": 384},
    "b": {"width": 512, "heads": 8, "layers": 12, "embed_dim": 512},
    "l": {"width": 768, "heads": 12, "layers": 12, "embed_dim": 768},
    "h": {"width": 1024, "heads": 16, "layers": 24, "embed_dim": 1024},
    "g": {"width": 1024, "heads": 16, "layers": 24, "embed_dim": 1024},
}

#: OpenCLIP's published parameter counts (docs/model_profile.csv, in millions) of the
#: models the clip flavors reproduce; `tests/unit/test_flavors.py` checks kiln's against them.
PUBLISHED_PARAMS: dict[str, float] = {
    "clip-vit-b-32": 151.28,
    "clip-vit-b-16": 149.62,
    "clip-vit-l-14": 427.62,
    "clip-vit-h-14": 986.11,
    "clip-vit-g-14": 1366.68,
}

_TINY_VISION = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 4}
_TINY_TEXT = {
    "vocab_size": 259,
    "context_length": 48,
    "width": 64,
    "layers": 2,
    "heads": 4,
    "tokenizer": "byte",
}
_SIGLIP = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}


def _standard(arch: str, size: str) -> dict[str, Any]:
    vision = {"image_size": 224, "mlp_ratio": 4.0, **VIT_SIZES[size]}
    text_size = dict(TEXT_SIZES[size.split("-")[0]])
    embed_dim = text_size.pop("embed_dim")
    text = {"vocab_size": 49408, "context_length": 77, "tokenizer": "clip-bpe", **text_size}
    fields: dict[str, Any] = {"arch": arch, "vision": vision, "embed_dim": embed_dim}
    if arch == "mae":
        fields["pixel_decoder"] = {"width": 512, "layers": 8, "heads": 16, "mask_ratio": 0.75}
        return fields
    fields["text"] = text
    if arch == "siglip":
        fields.update(_SIGLIP)
    if arch == "coca":
        fields["decoder"] = {
            "width": text["width"],
            "layers": text["layers"],
            "heads": text["heads"],
            "pooler_queries": 256,
            "pooler_heads": 8,
        }
    return fields


def _build() -> dict[str, dict[str, Any]]:
    flavors: dict[str, dict[str, Any]] = {}
    for arch in ("clip", "siglip", "coca", "mae"):
        for size in VIT_SIZES:
            flavors[f"{arch}-vit-{size}"] = _standard(arch, size)
    tiny = {"arch": "clip", "vision": _TINY_VISION, "text": _TINY_TEXT, "embed_dim": 64}
    flavors["clip-tiny"] = tiny
    flavors["siglip-tiny"] = {**tiny, "arch": "siglip", **_SIGLIP}
    flavors["coca-tiny"] = {
        **tiny,
        "arch": "coca",
        "decoder": {"width": 64, "layers": 2, "heads": 4, "pooler_queries": 16, "pooler_heads": 4},
    }
    flavors["mae-tiny"] = {
        "arch": "mae",
        "vision": {**_TINY_VISION, "patch_size": 4},
        "pixel_decoder": {"width": 64, "layers": 1, "heads": 4, "mask_ratio": 0.75},
        "embed_dim": 64,
    }
    return flavors


#: Every flavor name -> the ModelConfig fields it sets.
FLAVORS: dict[str, dict[str, Any]] = _build()
#: Short names accepted in recipes.
ALIASES: dict[str, str] = {"tiny": "clip-tiny"}


def flavor_names() -> list[str]:
    """Every accepted flavor name (aliases included), sorted."""
    return sorted([*FLAVORS, *ALIASES])


def flavor_fields(name: str) -> dict[str, Any]:
    """A fresh copy of the fields of flavor `name` (with ``flavor`` set to its real name).

    An unknown name is a ValueError listing the valid ones (closest first).
    """
    key = ALIASES.get(name, name) if isinstance(name, str) else name
    if key not in FLAVORS:
        close = difflib.get_close_matches(str(name), flavor_names(), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise ValueError(
            f"unknown model flavor {name!r}: {hint}valid flavors are {', '.join(flavor_names())}"
        )
    fields = copy.deepcopy(FLAVORS[key])
    fields["flavor"] = key
    return fields
