"""Build the model a `ModelConfig` describes, and count its parameters without memory.

One registry line per family (`MODEL_CLASSES`): the loop, eval and checkpoint code build
models through `build_model` and never name a family.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kiln.models.clip import CLIP
from kiln.models.coca import CoCa
from kiln.models.config import ModelConfig
from kiln.models.layers import set_activation_checkpointing
from kiln.models.mae import MAE

__all__ = ["MODEL_CLASSES", "build_model", "count_parameters"]

#: model.arch -> the class built for it.
MODEL_CLASSES: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "clip": CLIP,
    "siglip": CLIP,
    "coca": CoCa,
    "mae": MAE,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model `cfg` describes, initialized from torch's global RNG (seed it first).

    Built on the current default device: under ``with torch.device("meta")`` it allocates
    nothing (see `count_parameters`).
    """
    model = MODEL_CLASSES[cfg.arch](cfg)
    set_activation_checkpointing(model, cfg.activation_checkpointing)
    return model


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per tower (``vision``, ``text``, ``decoder``: the model class's
    ``TOWERS``), ``other`` (logit scale and bias) and ``total``.

    The model is built on the ``meta`` device, so even a billion-parameter flavor costs no
    memory and no initialization time.
    """
    with torch.device("meta"):
        model = build_model(cfg)
    towers: dict[str, tuple[str, ...]] = getattr(model, "TOWERS", {})
    owner = {top: tower for tower, tops in towers.items() for top in tops}
    counts = dict.fromkeys(towers, 0)
    counts["other"] = 0
    for name, p in model.named_parameters():
        counts[owner.get(name.split(".", 1)[0], "other")] += p.numel()
    counts["total"] = sum(counts.values())
    return counts
