"""kiln: curate web-scale image-text data and train vision(-language) models on it."""

__all__ = ["__version__"]
__version__ = "0.1.0"
