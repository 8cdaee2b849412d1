"""kiln's models: flavors (named sizes as data), towers, and the families built from them.

Plain torch, no DeepSpeed: training wraps them, curation's embed / score stages use them.

- `ModelConfig` (`kiln.models.config`): nested per-tower configs resolved from a flavor;
- `FLAVORS`, `flavor_names` (`kiln.models.flavors`): the registry of named sizes;
- `build_model(cfg)`, `count_parameters(cfg)` (`kiln.models.build`);
- `CLIP` (also SigLIP), `CoCa`, `MAE`; `model_info` for ``kiln model info``.

Imported lazily, so reading a config does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "CLIP",
    "FLAVORS",
    "MAE",
    "MAX_LOGIT_SCALE",
    "CoCa",
    "ModelConfig",
    "build_model",
    "count_parameters",
    "flavor_names",
    "model_info",
]

_EXPORTS = {
    "CLIP": "kiln.models.clip",
    "CoCa": "kiln.models.coca",
    "MAE": "kiln.models.mae",
    "FLAVORS": "kiln.models.flavors",
    "flavor_names": "kiln.models.flavors",
    "MAX_LOGIT_SCALE": "kiln.models.config",
    "ModelConfig": "kiln.models.config",
    "build_model": "kiln.models.build",
    "count_parameters": "kiln.models.build",
    "model_info": "kiln.models.info",
}

if TYPE_CHECKING:
    from kiln.models.build import build_model, count_parameters
    from kiln.models.clip import CLIP
    from kiln.models.coca import CoCa
    from kiln.models.config import MAX_LOGIT_SCALE, ModelConfig
    from kiln.models.flavors import FLAVORS, flavor_names
    from kiln.models.info import model_info
    from kiln.models.mae import MAE


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kiln.models' has no attribute {name!r}")
