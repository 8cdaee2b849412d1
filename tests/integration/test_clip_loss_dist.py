"""The distributed CLIP loss equals the single-process global-batch loss, with real gloo.

Two ranks each build the same small CLIP, take their half of one fixed global batch, run
`clip_loss` (which gathers embeddings with gradient) and backward; the gradients are then
averaged across ranks the way DeepSpeed/DDP do. They must match the gradients of one
process that sees the whole batch. The match is up to float rounding, not bitwise: the
gathered features enter matrix products whose rows are summed in a different order, and
the gradient reaches each rank's parameters as a sum over ranks (all-reduce) instead of one
accumulation, so the last bits differ. A control run that gathers *without* gradient (the
common bug) must not match, which shows the comparison has the power to fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from kiln.models.clip import CLIP
from kiln.models.config import ModelConfig
from kiln.training.objectives.clip import clip_loss
from tests.helpers_training import (
    MICRO_MODEL,
    clip_loss_of,
    gloo_group,
    seeded_model,
    spawn_gloo_ranks,
    word_batch,
)

pytestmark = pytest.mark.slow

WORLD = 2
GLOBAL_BATCH = 8
CFG = ModelConfig(**MICRO_MODEL)
WORDS = ["red", "green", "blue", "black", "white", "pink", "gray", "teal"]


def _grads(model: CLIP) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _average(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for g in grads.values():
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        g /= WORLD
    return grads


def _naive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The bug the real loss avoids: gathered features carry no gradient."""
    parts_i = [torch.empty_like(img) for _ in range(WORLD)]
    parts_t = [torch.empty_like(txt) for _ in range(WORLD)]
    dist.all_gather(parts_i, img.detach().contiguous())
    dist.all_gather(parts_t, txt.detach().contiguous())
    labels = torch.arange(img.shape[0]) + dist.get_rank() * img.shape[0]
    li = scale * img @ torch.cat(parts_t).T
    lt = scale * txt @ torch.cat(parts_i).T
    ce = torch.nn.functional.cross_entropy
    return (ce(li, labels) + ce(lt, labels)) / 2


def _worker(rank: int, port: int, out: str) -> None:
    with gloo_group(rank, WORLD, port):
        images, tokens = word_batch(CFG, WORDS)
        n = GLOBAL_BATCH // WORLD
        local = slice(rank * n, (rank + 1) * n)

        model = seeded_model(CFG)
        loss = clip_loss_of(model(images[local], tokens[local]))
        loss.backward()
        grads = _average(_grads(model))
        logged = loss.detach().clone()
        dist.all_reduce(logged, op=dist.ReduceOp.SUM)
        logged /= WORLD

        naive_model = seeded_model(CFG)
        o = naive_model(images[local], tokens[local])
        _naive_loss(o["image_embeds"], o["text_embeds"], o["logit_scale"]).backward()
        naive = _average(_grads(naive_model))

        # The caller's word that batches are equal saves the size check's all-gather and
        # changes no number.
        gathers = [0]
        all_gather = dist.all_gather

        def counted(*args: Any, **kwargs: Any) -> Any:
            gathers[0] += 1
            return all_gather(*args, **kwargs)

        o = seeded_model(CFG)(images[local], tokens[local])
        args = (o["image_embeds"], o["text_embeds"], o["logit_scale"])
        dist.all_gather = counted  # type: ignore[assignment]
        try:
            checked = clip_loss(*args)
            checked_gathers = gathers[0]
            trusted = clip_loss(*args, equal_batches=True)
            trusted_gathers = gathers[0] - checked_gathers
        finally:
            dist.all_gather = all_gather  # type: ignore[assignment]

        # Unequal local batches are refused on every rank, with the fix in the message.
        uneven = 2 + rank
        o = model(images[:uneven], tokens[:uneven])
        img, txt, scale = o["image_embeds"], o["text_embeds"], o["logit_scale"]
        try:
            clip_loss(img, txt, scale)
            uneven_error = ""
        except ValueError as e:
            uneven_error = str(e)

        if rank == 0:
            torch.save(
                {
                    "grads": grads,
                    "naive": naive,
                    "loss": logged,
                    "local_loss": loss.detach(),
                    "uneven_error": uneven_error,
                    "gathers": (checked_gathers, trusted_gathers),
                    "trusted_equal": torch.equal(checked, trusted),
                },
                out,
            )


def test_two_rank_gradients_equal_global_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = spawn_gloo_ranks(_worker, WORLD, tmp_path, monkeypatch)

    model = seeded_model(CFG)
    images, tokens = word_batch(CFG, WORDS)
    ref_loss = clip_loss_of(model(images, tokens))
    ref_loss.backward()
    ref = _grads(model)

    assert result["grads"].keys() == ref.keys() and len(ref) > 20
    for name, g in ref.items():
        # atol scales with the tensor: each rank's text tower trims the padding after its
        # own longest caption, so its matrix shapes (and roundings) differ from the global
        # batch's; entries that are sums of large, nearly cancelling terms keep ~1e-7 of
        # the tensor's scale as absolute error
        atol = 1e-6 * max(1.0, float(g.abs().max()))
        assert torch.allclose(result["grads"][name], g, rtol=1e-5, atol=atol), name
    torch.testing.assert_close(result["loss"], ref_loss.detach(), rtol=1e-6, atol=1e-6)
    # The rank's own loss is its share, not the global loss itself.
    assert not torch.allclose(result["local_loss"], ref_loss.detach(), atol=1e-4)
    # Control: gathering without gradient gives different (wrong) gradients.
    assert any(
        not torch.allclose(result["naive"][name], g, rtol=1e-3, atol=1e-5)
        for name, g in ref.items()
    )
    assert "local batch sizes differ across ranks [2, 3]" in result["uneven_error"]
    assert result["gathers"] == (2, 1) and result["trusted_equal"]
