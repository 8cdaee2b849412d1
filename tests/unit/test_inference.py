"""The Python API over kiln's outputs: `kiln.load_model` and `kiln.open_dataset`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import kiln
from kiln.models.build import build_model
from kiln.models.config import ModelConfig
from kiln.models.tokenizer import tokenize
from kiln.training.evaluate import save_model_file
from kiln.training.transforms import image_to_tensor
from tests.helpers_datasets import write_tiny_dataset
from tests.helpers_training import TINY_MODEL, tiny_flavor


def _saved(tmp_path: Path, model: dict[str, object]) -> tuple[str, torch.nn.Module]:
    cfg = ModelConfig.model_validate(model)
    torch.manual_seed(0)
    module = build_model(cfg).eval()
    return save_model_file(str(tmp_path / "model.pt"), module, cfg, step=5), module


def test_model_takes_pil_images_and_strings(tmp_path: Path) -> None:
    path, module = _saved(tmp_path, TINY_MODEL)
    model = kiln.load_model(path)
    assert model.step == 5 and model.cfg.flavor == "clip-tiny" and "clip-tiny" in repr(model)
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    expected = torch.stack([image_to_tensor(i, 16, augment=False, rng=None) for i in images])
    with torch.no_grad():
        ref_img = module.encode_image(expected)
        ref_txt = module.encode_text(tokenize(["a red thing", "x"], 16))
    assert torch.equal(model.encode_image(images), ref_img)
    assert torch.equal(model.encode_image(expected), ref_img)  # tensors pass through
    images[0].save(tmp_path / "red.png")  # a file (lossless): batch of 1, so not bitwise
    torch.testing.assert_close(model.encode_image(tmp_path / "red.png"), ref_img[:1])
    assert torch.equal(model.encode_text(["a red thing", "x"]), ref_txt)
    torch.testing.assert_close(model.encode_text("a red thing"), ref_txt[:1])
    probs = model.similarity(images, ["red", "blue", "green"])
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="coca"):
        model.generate(images)


def test_empty_inputs_give_empty_results(tmp_path: Path) -> None:
    """A batch job's last chunk may be empty: no images and no texts give empty results,
    as a list of them does (not a torch error from stacking nothing or pooling nothing)."""
    clip = kiln.load_model(_saved(tmp_path, TINY_MODEL)[0])
    dim = clip.cfg.embed_dim
    assert clip.encode_image([]).shape == clip.encode_text([]).shape == (0, dim)
    assert clip.similarity([], ["red"]).shape == (0, 1)
    coca_dir = tmp_path / "coca"
    coca_dir.mkdir()
    coca = kiln.load_model(_saved(coca_dir, tiny_flavor("coca"))[0])
    assert coca.generate([]) == [] and coca.generate([], num_beams=2) == []
    assert coca.encode_text([]).shape[0] == 0


def test_coca_model_writes_captions_and_mae_has_no_text(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path, tiny_flavor("coca"))
    captions = kiln.load_model(path).generate([Image.new("RGB", (20, 20), "red")], max_length=6)
    assert len(captions) == 1 and isinstance(captions[0], str)
    mae_dir = tmp_path / "mae"
    mae_dir.mkdir()
    mae, _ = _saved(mae_dir, tiny_flavor("mae"))
    with pytest.raises(ValueError, match="no text tower"):
        kiln.load_model(mae).encode_text(["a"])


def test_open_dataset_yields_every_sample_with_its_image(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "ds", num_samples=20)
    data = kiln.open_dataset(root)
    samples = list(data)
    assert len(data) == len(samples) == 20
    assert len({s.uid for s in samples}) == 20
    first = samples[0]
    assert first.text and first.image is not None and first.image.size == (20, 20)
