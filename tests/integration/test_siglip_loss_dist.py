"""SigLIP's chunked (ring) loss equals the single-process global-batch loss, with real gloo.

At 2 and 3 ranks, each rank builds the same small SigLIP model, takes its share of one
fixed global batch, runs `siglip_loss` (text embeddings passed around a ring of
send/recv, gradient flowing back the same way) and backward; gradients are averaged over
ranks as DeepSpeed/DDP do. Loss (mean over ranks) and every parameter gradient must match
one process computing the loss over the whole batch, for the ring exchange and the
all-gather variant. Control: a ring whose received chunks carry no gradient must not
match, which shows the comparison can fail. Match is to float rounding (sums run in a
different order), not bitwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from kiln.models.config import ModelConfig
from kiln.training.objectives.siglip import _pair_loss, siglip_loss
from tests.helpers_training import (
    MICRO_MODEL,
    gloo_group,
    seeded_model,
    spawn_gloo_ranks,
    word_batch,
)

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 12
CFG = ModelConfig.model_validate({**MICRO_MODEL, "flavor": "siglip-tiny"})
WORDS = ["red", "green", "blue", "black", "white", "pink", "gray", "teal", "gold", "tan", "a", "b"]


def _loss(
    model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, **kw: str
) -> torch.Tensor:
    out = model(images, tokens)
    return siglip_loss(
        out["image_embeds"], out["text_embeds"], out["logit_scale"], out["logit_bias"], **kw
    )


def _grads(model: torch.nn.Module, world: int, average: bool = True) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    if average:
        for g in grads.values():
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
            g /= world
    return grads


def _detached_ring_loss(
    model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """The bug the real loss avoids: received text chunks carry no gradient."""
    out = model(images, tokens)
    img, txt = out["image_embeds"], out["text_embeds"]
    scale, bias = out["logit_scale"], out["logit_bias"]
    rank, world = dist.get_rank(), dist.get_world_size()
    total = _pair_loss(img, txt, scale, bias, matched=True)
    chunk = txt.detach()
    for _ in range(world - 1):
        recv = torch.empty_like(chunk)
        reqs = [
            dist.isend(chunk.contiguous(), (rank + 1) % world),
            dist.irecv(recv, (rank - 1) % world),
        ]
        for r in reqs:
            r.wait()
        chunk = recv
        total = total + _pair_loss(img, chunk, scale, bias, matched=False)
    return total / img.shape[0]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    with gloo_group(rank, world, port):
        images, tokens = word_batch(CFG, WORDS)
        n = GLOBAL_BATCH // world
        local = slice(rank * n, (rank + 1) * n)
        result: dict[str, object] = {}
        for exchange in ("ring", "all_gather"):
            model = seeded_model(CFG)
            loss = _loss(model, images[local], tokens[local], exchange=exchange)
            loss.backward()
            logged = loss.detach().clone()
            dist.all_reduce(logged, op=dist.ReduceOp.SUM)
            result[exchange] = {"grads": _grads(model, world), "loss": logged / world}
        naive = seeded_model(CFG)
        _detached_ring_loss(naive, images[local], tokens[local]).backward()
        result["naive"] = _grads(naive, world)
        if rank == 0:
            torch.save(result, out)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference relative to the tensor's largest entry (SigLIP sums over every
    pair, so gradients reach ~10 and an element-wise rtol on near-zero entries is noise)."""
    return (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_siglip_ring_gradients_equal_global_batch(
    world: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = spawn_gloo_ranks(_worker, world, tmp_path, monkeypatch, world)

    model = seeded_model(CFG)
    images, tokens = word_batch(CFG, WORDS)
    ref_loss = _loss(model, images, tokens)
    ref_loss.backward()
    ref = _grads(model, 1, average=False)
    assert "logit_bias" in ref and len(ref) > 20

    for exchange in ("ring", "all_gather"):
        got = result[exchange]
        torch.testing.assert_close(got["loss"], ref_loss.detach(), rtol=1e-6, atol=1e-5)
        assert got["grads"].keys() == ref.keys()
        for name, g in ref.items():
            err = (got["grads"][name] - g).abs().max().item() / g.abs().max().clamp(min=1e-6).item()
            assert err < 1e-5, (exchange, name, err)
    assert any(
        not torch.allclose(result["naive"][name], g, rtol=1e-3, atol=1e-5)
        for name, g in ref.items()
    )
