"""The CLIP model under real DeepSpeed ZeRO-3 on 2 gloo ranks.

Models know nothing of DeepSpeed, but they must survive it: built inside ``zero.Init``
(parameters partitioned as each module's ``__init__`` returns) they must hold exactly the
weights of a plain build from the same seed, and a forward/backward through the ZeRO-3
engine with `clip_loss`, each rank on half of a global batch, must give the gradients of a
single process on the whole batch (up to float rounding: reduction order differs).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from kiln.models.build import build_model
from kiln.models.clip import CLIP
from kiln.models.config import ModelConfig
from kiln.models.tokenizer import tokenize
from kiln.training.engine import param_groups
from tests.helpers_training import (
    MICRO_MODEL,
    clip_loss_of,
    leave_gloo_group,
    rank_env,
    spawn_gloo_ranks,
)

pytestmark = pytest.mark.slow

WORLD = 2
CFG = ModelConfig(**MICRO_MODEL)
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def _plain() -> CLIP:
    torch.manual_seed(0)
    return build_model(CFG)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 16, 16, generator=gen)
    return images, tokenize(["red", "a green dot", "blue", "pink ✓"], CFG.context_length)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(rank_env(rank, WORLD, port))
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120))
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
        model = build_model(CFG)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # weight decay goes by the parameter's real shape, not the empty shard's
    groups = [sorted(id(p) for p in g["params"]) for g in param_groups(model, 0.1)]
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=DS_CONFIG
    )
    images, tokens = _batch()
    local = slice(2 * rank, 2 * rank + 2)
    loss = clip_loss_of(engine(images[local], tokens[local]))
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in model.named_parameters()}
    logged = loss.detach().clone()
    torch.distributed.all_reduce(logged)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[i] for i in groups[0])
    if rank == 0:
        torch.save({"init": init, "grads": grads, "loss": logged / WORLD, "decay": decayed}, out)
    engine.destroy()
    leave_gloo_group()


def test_zero3_init_and_gradients_match_plain_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    result = spawn_gloo_ranks(_worker, WORLD, tmp_path, monkeypatch)

    model = _plain()
    for name, value in model.state_dict().items():
        assert torch.equal(result["init"][name], value), name
    plain_groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert result["decay"] == sorted(names[id(p)] for p in plain_groups[0]["params"])

    images, tokens = _batch()
    ref = clip_loss_of(model(images, tokens))
    ref.backward()
    torch.testing.assert_close(result["loss"], ref.detach(), rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        assert p.grad is not None
        # Rounding scales with the tensor's magnitude (the text embeddings' gradients reach
        # ~30), so the tolerance is relative to each tensor's largest entry.
        atol = 1e-6 * max(1.0, p.grad.abs().max().item())
        assert torch.allclose(result["grads"][name], p.grad, rtol=1e-5, atol=atol), name
