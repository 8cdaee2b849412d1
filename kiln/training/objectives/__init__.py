"""Training objectives behind one interface (`Objective`): CLIP, SigLIP, CoCa, MAE.

Adding an objective: a module here with an `Objective` subclass, its config class in
`kiln.training.objectives.config`, and one line in `OBJECTIVES`. The loop builds the
objective a run's config names through `build_objective` and never names one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.training.objectives.base import Objective

__all__ = ["OBJECTIVES", "Objective", "build_objective"]

#: objective name -> "module:class" (imported when used).
OBJECTIVES: dict[str, str] = {
    "clip": "kiln.training.objectives.clip:ClipObjective",
    "siglip": "kiln.training.objectives.siglip:SiglipObjective",
    "coca": "kiln.training.objectives.coca:CocaObjective",
    "mae": "kiln.training.objectives.mae:MaeObjective",
}


def __getattr__(name: str) -> Any:
    # lazy, so importing kiln.training.objectives.config (recipes) does not import torch
    if name == "Objective":
        return importlib.import_module("kiln.training.objectives.base").Objective
    raise AttributeError(f"module 'kiln.training.objectives' has no attribute {name!r}")


def build_objective(cfg: Any, group: Any = None, *, equal_batches: bool = False) -> Objective:
    """The objective `cfg` (an objective config with a ``name``) describes (`group`,
    `equal_batches`: `Objective`'s)."""
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.name!r}: valid ones are {sorted(OBJECTIVES)}")
    module, cls = OBJECTIVES[cfg.name].split(":")
    objective: Objective = getattr(importlib.import_module(module), cls)(
        cfg, group, equal_batches=equal_batches
    )
    return objective
