"""A trained kiln model in eval mode, ready to embed (and caption): what `kiln.load_model`
returns and what curation's embed stage runs.

It lives with the models, not in the `kiln.inference` facade, so curation can use it
without importing training (DESIGN.md's layering); `kiln.inference.load_model` adds
exporting a large model's checkpoint on first use, which needs training's DeepSpeed code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from kiln.models.config import ModelConfig
from kiln.models.preprocess import ImageLike, as_pil, preprocess_image
from kiln.models.weights import load_model_file

__all__ = ["Model"]


class Model:
    """A trained kiln model in eval mode: `encode_image`, `encode_text`, `similarity`,
    `generate` (CoCa). The torch module is `module`, its config `cfg`, its step `step`."""

    def __init__(self, module: nn.Module, cfg: ModelConfig, step: int) -> None:
        self.module = module.eval()
        self.cfg = cfg
        self.step = step

    @classmethod
    def from_file(cls, path: str | Path) -> Model:
        """The model of a weights file: a kiln ``model.pt`` or an exported ``.safetensors``
        (find one with `kiln.models.weights.existing_weights`)."""
        module, cfg, step = load_model_file(str(path))
        return cls(module, cfg, step)

    def __repr__(self) -> str:
        return f"kiln.Model({self.cfg.flavor}, arch={self.cfg.arch}, step={self.step})"

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self, device: str | torch.device) -> Model:
        """Move the model (e.g. ``"cuda"``); returns self."""
        self.module.to(device)
        return self

    def preprocess(self, image: ImageLike) -> torch.Tensor:
        """`kiln eval`'s transform: RGB, shorter side to the model's image size, centre
        crop, CLIP normalization -> ``float32 [3, S, S]``."""
        return preprocess_image(as_pil(image), self.cfg.image_size)

    def _images(self, images: ImageLike | Sequence[ImageLike] | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            batch = images if images.ndim == 4 else images.unsqueeze(0)
        else:
            items = [images] if isinstance(images, (Image.Image, str, Path, bytes)) else images
            size = self.cfg.image_size  # no images: an empty batch, as no texts give one
            pixels = [self.preprocess(x) for x in items]
            batch = torch.stack(pixels) if pixels else torch.empty(0, 3, size, size)
        return batch.to(self.device)

    def _tokens(self, texts: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        from kiln.models.tokenizer import tokenize

        if isinstance(texts, torch.Tensor):
            return texts.to(self.device)
        return tokenize(
            [texts] if isinstance(texts, str) else list(texts), self.cfg.context_length
        ).to(self.device)

    @torch.no_grad()
    def encode_image(self, images: ImageLike | Sequence[ImageLike] | torch.Tensor) -> torch.Tensor:
        """Image embeddings ``[N, D]`` (L2-normalized for CLIP-family models) of PIL images,
        image files or bytes (preprocessed here), or of a preprocessed ``[N, 3, S, S]``
        tensor."""
        encode: Any = self.module.encode_image
        out: torch.Tensor = encode(self._images(images))
        return out

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Text embeddings ``[N, D]`` of strings (tokenized here) or of token ids."""
        if not hasattr(self.module, "encode_text"):
            raise ValueError(f"a {self.cfg.arch} model has no text tower: it encodes images only")
        encode: Any = self.module.encode_text
        out: torch.Tensor = encode(self._tokens(texts))
        return out

    @torch.no_grad()
    def similarity(
        self, images: ImageLike | Sequence[ImageLike] | torch.Tensor, texts: Sequence[str]
    ) -> torch.Tensor:
        """``[images, texts]`` probabilities: for each image, a softmax over `texts` of
        the cosine similarities (zero-shot classification with texts as the classes)."""
        img = torch.nn.functional.normalize(self.encode_image(images).float(), dim=-1)
        txt = torch.nn.functional.normalize(self.encode_text(texts).float(), dim=-1)
        return (100.0 * img @ txt.T).softmax(dim=-1)

    @torch.no_grad()
    def generate(
        self,
        images: ImageLike | Sequence[ImageLike] | torch.Tensor,
        *,
        max_length: int | None = None,
        num_beams: int = 1,
    ) -> list[str]:
        """Captions of `images` (CoCa models): greedy, or beam search with `num_beams`;
        `max_length` tokens at most (BOS included; default and limit: the context length)."""
        from kiln.models.tokenizer import decode

        if not hasattr(self.module, "generate"):
            raise ValueError(
                f"a {self.cfg.arch} model does not write captions: generate() needs a coca-* flavor"
            )
        generate: Any = self.module.generate
        ids = generate(self._images(images), max_length=max_length, num_beams=num_beams)
        return [decode(row) for row in ids]
