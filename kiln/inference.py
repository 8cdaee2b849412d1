"""Use what kiln made, from Python: a trained model and a curated dataset.

- `load_model(run_or_file)` -> `Model`: PIL images (or tensors) and strings in, embeddings
  (and CoCa captions) out, with the exact eval preprocessing of `kiln eval`.
- `open_dataset(dataset_dir)` -> `Dataset`: the samples of a curated dataset, with decoded
  images, in shard order.

Both read kiln's own files offline and on CPU (``Model.to("cuda")`` moves a model).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from kiln.models.config import ModelConfig

__all__ = ["Dataset", "Model", "Sample", "load_model", "model_file", "open_dataset"]

ImageLike = Image.Image | str | Path | bytes


def _as_pil(image: ImageLike) -> Image.Image:
    from kiln.training.transforms import decode_rgb

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, bytes):
        return decode_rgb(image)
    return decode_rgb(Path(image).read_bytes())


class Model:
    """A trained kiln model in eval mode: `encode_image`, `encode_text`, `similarity`,
    `generate` (CoCa). The torch module is `module`, its config `cfg`, its step `step`."""

    def __init__(self, module: nn.Module, cfg: ModelConfig, step: int) -> None:
        self.module = module.eval()
        self.cfg = cfg
        self.step = step

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
        from kiln.training.transforms import image_to_tensor

        return image_to_tensor(_as_pil(image), self.cfg.image_size, augment=False, rng=None)

    def _images(self, images: ImageLike | Sequence[ImageLike] | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            batch = images if images.ndim == 4 else images.unsqueeze(0)
        else:
            items = [images] if isinstance(images, (Image.Image, str, Path, bytes)) else images
            batch = torch.stack([self.preprocess(x) for x in items])
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
        """Captions of `images` (CoCa models): greedy, or beam search with `num_beams`."""
        from kiln.models.tokenizer import decode

        if not hasattr(self.module, "generate"):
            raise ValueError(
                f"a {self.cfg.arch} model does not write captions: generate() needs a coca-* flavor"
            )
        generate: Any = self.module.generate
        ids = generate(self._images(images), max_length=max_length, num_beams=num_beams)
        return [decode(row) for row in ids]


def load_model(source: str | Path, *, step: int | None = None) -> Model:
    """The trained model of `source`: a train run dir (its latest complete checkpoint, or
    `step`), a checkpoint folder, a ``model.pt`` or an exported ``.safetensors``. A
    checkpoint without ``model.pt`` (large models) is exported once, on first use."""
    from kiln.training.evaluate import load_model_file
    from kiln.training.export import resolve_weights

    module, cfg, at = load_model_file(str(resolve_weights(source, step=step)))
    return Model(module, cfg, at)


def model_file(source: str | Path, *, step: int | None = None) -> Path:
    """The weights file `load_model(source, step=step)` reads (what a model's hash is of)."""
    from kiln.training.export import resolve_weights

    return resolve_weights(source, step=step)


@dataclass
class Sample:
    """One sample of a curated dataset: its uid, caption, metadata (the ``.json`` member)
    and encoded image bytes; `image` decodes them."""

    uid: str
    text: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    image_bytes: bytes | None = None

    @property
    def image(self) -> Image.Image | None:
        return _as_pil(self.image_bytes) if self.image_bytes is not None else None


class Dataset:
    """The samples of a dataset `kiln curate` wrote (its folder, or any fsspec URL of it),
    in shard order. ``len()`` is the manifest's sample count; iterating reads the shards."""

    def __init__(self, dataset_dir: str | Path) -> None:
        from kiln.contracts import read_manifest

        self.path = str(dataset_dir)
        self.manifest = read_manifest(self.path)

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __repr__(self) -> str:
        return f"kiln.Dataset({self.path!r}, {len(self)} samples)"

    def __iter__(self) -> Iterator[Sample]:
        from kiln.training.evaluate import image_member, iter_samples

        for _, key, members in iter_samples(self.path):
            text = members.get("txt")
            meta = json.loads(members["json"]) if "json" in members else {}
            image = image_member(members)
            yield Sample(
                uid=key.rpartition("/")[2],
                text=text.decode("utf-8", errors="replace") if text is not None else None,
                meta=meta,
                image_bytes=image,
            )


def open_dataset(dataset_dir: str | Path) -> Dataset:
    """The curated dataset at `dataset_dir` (a folder holding ``manifest.json``)."""
    return Dataset(dataset_dir)
