"""Objectives behind one interface: each trains its tiny flavor; MAE masking, CoCa captions,
the image-only loader path and the objective-vs-dataset check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.models.build import build_model
from kiln.models.mae import random_masking
from kiln.models.tokenizer import BOS_ID, EOS_ID
from kiln.training import train
from kiln.training.config import TrainConfig
from kiln.training.data import WebDatasetLoader, dataset_has_text
from kiln.training.objectives import OBJECTIVES, build_objective
from kiln.training.objectives.mae import mae_loss
from tests.helpers_datasets import write_tiny_dataset
from tests.helpers_training import tiny_flavor


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_dataset(tmp_path_factory.mktemp("obj") / "ds", num_samples=64))


@pytest.fixture(scope="module")
def images_only(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("obj") / "images"
    return str(write_tiny_dataset(root, num_samples=32, with_text=False))


def _config(dataset: str, arch: str) -> TrainConfig:
    return TrainConfig.model_validate(
        {"data": {"dataset": dataset, "batch_size": 16}, "model": tiny_flavor(arch)}
    )


@pytest.mark.parametrize("arch", sorted(OBJECTIVES))
def test_objective_trains_its_tiny_flavor(arch: str, dataset: str) -> None:
    cfg = _config(dataset, arch)
    assert cfg.objective is not None and cfg.objective.name == arch
    objective = build_objective(cfg.objective)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    loader = WebDatasetLoader(
        dataset,
        batch_size=16,
        seed=0,
        augment=False,
        image_size=cfg.model.image_size,
        context_length=cfg.model.context_length,
        with_text=objective.needs_text,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _, batch in zip(range(40), loader, strict=False):
        assert (batch.tokens is not None) == (arch != "mae")  # MAE never reads captions
        fields = batch.to("cpu", torch.float32, objective.batch_fields)
        outputs = model(**objective.model_inputs(fields))
        objective.check_outputs(outputs)
        loss, logs = objective.loss(outputs, fields)
        assert all(v.ndim == 0 for v in logs.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.85 * first, (arch, losses)


def test_objective_rejects_a_model_without_its_outputs(dataset: str) -> None:
    objective = build_objective(_config(dataset, "siglip").objective)
    with pytest.raises(ValueError, match=r"needs model outputs \['logit_scale', 'logit_bias'\]"):
        objective.check_outputs({"image_embeds": torch.zeros(1), "text_embeds": torch.zeros(1)})


def test_mae_masking_is_a_function_of_the_seed() -> None:
    seeds = torch.tensor([5, 5, 6])
    keep, mask, restore = random_masking(seeds, num_patches=16, num_keep=4)
    assert keep.shape == (3, 4) and mask.shape == (3, 16)
    assert torch.equal(keep[0], keep[1]) and not torch.equal(keep[0], keep[2])
    assert mask.sum(dim=1).tolist() == [12.0, 12.0, 12.0]
    assert all(mask[r, keep[r]].sum() == 0 for r in range(3))
    # restore puts [visible..., hidden...] back in patch order
    hidden = torch.stack([torch.nonzero(mask[r]).flatten() for r in range(3)])
    order = torch.cat([keep, hidden], dim=1)
    assert torch.equal(torch.gather(order, 1, restore), torch.arange(16).expand(3, 16))


def test_mae_loss_counts_masked_patches_only() -> None:
    target = torch.randn(2, 4, 12)
    pred = target.clone()
    mask = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0]])
    pred[0, 1] += 5.0  # visible patch: ignored
    assert mae_loss(pred, target, mask, norm_pix=False).item() == 0.0
    pred[1, 2] += 1.0
    assert mae_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(0.5)


def test_coca_captions_greedy_and_beam() -> None:
    cfg = TrainConfig.model_validate(
        {"data": {"dataset": "unused"}, "model": tiny_flavor("coca")}
    ).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    greedy = model.generate(images, max_length=8)
    beam = model.generate(images, max_length=8, num_beams=3)
    assert greedy == model.generate(images, max_length=8)  # deterministic
    for seq in [*greedy, *beam]:
        assert seq[0] == BOS_ID and 2 <= len(seq) <= 8
        assert EOS_ID not in seq[1:-1]
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(images, num_beams=0)
    full = model.generate(images, max_length=cfg.context_length)
    assert model.generate(images) == full  # the default is the context length
    for bad in (0, 1, cfg.context_length + 1):  # 0 was read as "no limit", more was cut
        with pytest.raises(ValueError, match=f"max_length={bad} must be between 2"):
            model.generate(images, max_length=bad)


def test_image_only_dataset(images_only: str, dataset: str, tmp_path: Path) -> None:
    assert dataset_has_text(dataset) and not dataset_has_text(images_only)
    loader = WebDatasetLoader(images_only, batch_size=8, seed=0, image_size=16, with_text=False)
    batch = next(iter(loader))
    assert batch.tokens is None and batch.sample_seeds is not None
    assert batch.sample_seeds.shape == (8,)
    # an objective that reads captions is refused before any rank starts, naming both
    with pytest.raises(ValueError, match=r"objective 'clip' trains on captions") as e:
        train(_config(images_only, "clip"), str(tmp_path / "run"), launcher="local")
    assert images_only in str(e.value)
    assert not (tmp_path / "run").exists()
