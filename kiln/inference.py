"""Use what kiln made, from Python: a trained model and a curated dataset.

- `load_model(run_or_file)` -> `Model`: PIL images (or tensors) and strings in, embeddings
  (and CoCa captions) out, with the exact eval preprocessing of `kiln eval`.
- `open_dataset(dataset_dir)` -> `Dataset`: the samples of a curated dataset, with decoded
  images, in shard order.

Both read kiln's own files offline and on CPU (``Model.to("cuda")`` moves a model).
`Model` itself is `kiln.models.trained.Model` (curation's embed stage uses it too).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from kiln.models.preprocess import ImageLike, as_pil
from kiln.models.trained import Model

__all__ = ["Dataset", "ImageLike", "Model", "Sample", "load_model", "model_file", "open_dataset"]


def load_model(source: str | Path, *, step: int | None = None) -> Model:
    """The trained model of `source`: a train run dir (its latest complete checkpoint, or
    `step`), a checkpoint folder, a ``model.pt`` or an exported ``.safetensors``. A
    checkpoint without ``model.pt`` (large models) is exported once, on first use."""
    from kiln.training.export import resolve_weights

    return Model.from_file(resolve_weights(source, step=step))


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
        return as_pil(self.image_bytes) if self.image_bytes is not None else None


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
