"""kiln: curate web-scale image-text data and train vision(-language) models on it.

The Python API (each imported on first use, so ``import kiln`` stays light):

- ``kiln.curate(recipe, overrides=None)``: `kiln curate` -> a CurationResult;
- ``kiln.train(recipe, overrides=None, resume=False)``: `kiln train` -> a TrainSummary;
- ``kiln.load_model(run_or_file)`` -> a `kiln.inference.Model` (``encode_image`` of PIL
  images, ``encode_text`` of strings, ``similarity``, ``generate`` for CoCa);
- ``kiln.open_dataset(dataset_dir)`` -> the samples of a curated dataset, images decoded.

A recipe is a YAML path, a dict, or a recipe object (`kiln.platform.recipes`).
"""

import importlib
from typing import Any

__all__ = ["__version__", "curate", "load_model", "open_dataset", "train"]
__version__ = "0.1.0"

_EXPORTS = {
    "curate": "kiln.platform.api",
    "train": "kiln.platform.api",
    "load_model": "kiln.inference",
    "open_dataset": "kiln.inference",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
