"""kiln: curate web-scale image-text data and train vision(-language) models on it.

``kiln.load_model(run_or_file)`` gives a trained model (`kiln.training.export.load_model`);
it is imported on first use, so ``import kiln`` stays light (no torch).
"""

from typing import Any

__all__ = ["__version__", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from kiln.training.export import load_model

        return load_model
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
