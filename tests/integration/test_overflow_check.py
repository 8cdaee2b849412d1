"""ZeRO 1-2 skip a step whose gradients hold an inf or NaN through the global gradient norm
alone: kiln drops DeepSpeed's per-gradient scan for them (7 kernel launches a parameter,
`kiln.training.deepspeed_patches._patch_redundant_overflow_scan`), and the engine trains
and skips exactly the steps DeepSpeed's own check does. Real DeepSpeed, one gloo rank."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from kiln.models.build import build_model
from kiln.training import deepspeed_patches
from kiln.training.config import TrainConfig
from kiln.training.engine import build_engine, import_deepspeed, init_distributed
from kiln.training.launch import free_port
from tests.helpers_training import MICRO_MODEL, clip_loss_of, destroy_groups, word_batch

WORDS = ["red", "green", "blue", "pink"]


def _train(
    precision: str, stage: int, bad_step: int, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Three steps of MICRO_MODEL, the second with one element of one gradient made inf;
    the weights after each step, the steps DeepSpeed skipped, and how many times its
    per-gradient scan ran."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    cfg = TrainConfig.model_validate(
        {
            "data": {"dataset": "unused", "batch_size": 4},
            "model": MICRO_MODEL,
            "zero": {"stage": stage, "precision": precision},
        }
    )
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # a world of its own
    init_distributed()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    engine = build_engine(model, cfg, 1)
    scans = 0
    scan = DeepSpeedZeroOptimizer.has_overflow

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal scans
        scans += 1
        return scan(self, *args, **kwargs)

    poison = {"on": False}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if not poison["on"]:
            return grad
        grad = grad.clone()
        grad.view(-1)[0] = math.inf
        return grad

    model.visual.ln_post.weight.register_hook(hook)
    images, tokens = word_batch(cfg.model, WORDS)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    weights, norms = [], []
    DeepSpeedZeroOptimizer.has_overflow = counted
    try:
        for step in range(3):
            poison["on"] = step == bad_step
            engine.backward(clip_loss_of(engine(images.to(dtype), tokens)))
            engine.step()
            weights.append([p.detach().float().clone() for p in model.parameters()])
            norms.append(float(engine.get_global_grad_norm()))
    finally:
        DeepSpeedZeroOptimizer.has_overflow = scan
    skipped = engine.skipped_steps
    engine.destroy()
    destroy_groups()
    return {"weights": weights, "norms": norms, "skipped": skipped, "scans": scans}


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "stage"), [("fp32", 2), ("bf16", 2), ("bf16", 1)])
def test_the_global_norm_alone_skips_an_inf_step_as_deepspeeds_scan_does(
    precision: str, stage: int, single_rank: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import_deepspeed()  # kiln's patches in place
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    patched = _train(precision, stage, bad_step=1, monkeypatch=monkeypatch)
    assert patched["scans"] == 0  # the per-gradient scan never ran
    assert patched["skipped"] == 1
    assert patched["norms"][1] == math.inf
    assert all(math.isfinite(n) for n in (patched["norms"][0], patched["norms"][2]))
    first, second, third = patched["weights"]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # skipped
    assert not all(torch.equal(a, b) for a, b in zip(second, third, strict=True))

    # DeepSpeed's own check, scan included, trains and skips the same steps bitwise
    original = DeepSpeedZeroOptimizer.check_overflow._kiln_original  # type: ignore[attr-defined]
    monkeypatch.setattr(DeepSpeedZeroOptimizer, "check_overflow", original)
    monkeypatch.setattr(deepspeed_patches, "_patch_redundant_overflow_scan", lambda ds: None)
    stock = _train(precision, stage, bad_step=1, monkeypatch=monkeypatch)
    # (in fp32 DeepSpeed itself leaves the test to the norm: no scan either way)
    assert stock["scans"] == (3 if precision == "bf16" else 0)
    assert stock["skipped"] == 1 and stock["norms"][1] == math.inf
    assert stock["norms"] == patched["norms"]
    for ours, theirs in zip(patched["weights"], stock["weights"], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
