"""kiln's training side: objectives, loader, DeepSpeed engine, checkpoints, loop, launchers.

Public API (imported lazily, so ``kiln.training.config`` stays cheap to import for code
that only reads recipes):

- `train(cfg, run_dir, ...) -> TrainSummary`: run or resume training (local or Ray Train).
- `TrainSummary`, `TrainLaunchError`.
- `train_worker`: the per-rank loop, for custom launchers.
- `WebDatasetLoader`: the deterministic, resumable loader.
- `latest_checkpoint`: the tag a resume would start from.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "TrainLaunchError",
    "TrainSummary",
    "WebDatasetLoader",
    "latest_checkpoint",
    "train",
    "train_worker",
]

_EXPORTS = {
    "TrainLaunchError": "kiln.training.launch",
    "TrainSummary": "kiln.training.launch",
    "train": "kiln.training.launch",
    "train_worker": "kiln.training.loop",
    "WebDatasetLoader": "kiln.training.data",
    "latest_checkpoint": "kiln.models.checkpoint_index",
}

if TYPE_CHECKING:
    from kiln.models.checkpoint_index import latest_checkpoint
    from kiln.training.data import WebDatasetLoader
    from kiln.training.launch import TrainLaunchError, TrainSummary, train
    from kiln.training.loop import train_worker


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kiln.training' has no attribute {name!r}")
