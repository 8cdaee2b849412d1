"""ZeRO 1-2 all-reduce the global gradient norm once a step, not once per parameter group
(`kiln.training.deepspeed_patches._patch_one_norm_all_reduce`), and train bitwise the
same weights, with the same norms, as DeepSpeed's own per-group all-reduces. Real
DeepSpeed, two real gloo ranks, each on its own half of the batch (so the ranks' sums
differ and the all-reduce has something to add)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers_training import (
    MICRO_MODEL,
    clip_loss_of,
    leave_gloo_group,
    rank_env,
    spawn_gloo_ranks,
    word_batch,
)

pytestmark = pytest.mark.slow

CASES = [("fp32", 1), ("fp32", 2), ("bf16", 2)]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(rank_env(rank, 2, port))
    torch.set_num_threads(1)
    from deepspeed import comm as ds_dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from kiln.models.build import build_model
    from kiln.training import deepspeed_patches
    from kiln.training.config import TrainConfig
    from kiln.training.engine import build_engine, import_deepspeed, init_distributed

    import_deepspeed()  # kiln's patches in place
    init_distributed()
    patched = DeepSpeedZeroOptimizer.scaled_global_norm
    # build_engine applies the patches again: from here on they leave the norm as it is set
    deepspeed_patches._patch_one_norm_all_reduce = lambda deepspeed: None  # type: ignore[assignment]
    calls = [0]
    all_reduce = ds_dist.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return all_reduce(*args, **kwargs)

    results: dict[Any, Any] = {}
    for precision, stage in CASES:
        cfg = TrainConfig.model_validate(
            {
                "data": {"dataset": "unused", "batch_size": 2},
                "model": MICRO_MODEL,
                "optim": {"lr": 1e-2, "warmup_steps": 1, "grad_clip": 0.05},  # clips
                "zero": {"stage": stage, "precision": precision},
            }
        )
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        images, tokens = word_batch(cfg.model, ["red", "green", "blue", "pink"])
        mine = slice(2 * rank, 2 * rank + 2)
        for way in ("kiln", "deepspeed"):
            DeepSpeedZeroOptimizer.scaled_global_norm = (
                patched if way == "kiln" else patched._kiln_original  # type: ignore[attr-defined]
            )
            torch.manual_seed(0)
            model = build_model(cfg.model)
            engine = build_engine(model, cfg, 2)
            norms, step_all_reduces = [], 0
            for _ in range(3):
                engine.backward(clip_loss_of(engine(images[mine].to(dtype), tokens[mine])))
                before = calls[0]
                ds_dist.all_reduce = counted
                try:
                    engine.step()
                finally:
                    ds_dist.all_reduce = all_reduce
                step_all_reduces += calls[0] - before
                norms.append(float(engine.get_global_grad_norm()))
            weights = {n: p.detach().float().clone() for n, p in model.named_parameters()}
            groups = len(engine.optimizer.param_groups)
            results[(precision, stage, way)] = (weights, norms, step_all_reduces, groups)
            engine.destroy()
    DeepSpeedZeroOptimizer.scaled_global_norm = patched
    if rank == 0:
        torch.save(results, out)
    leave_gloo_group()


def test_one_norm_all_reduce_a_step_trains_deepspeeds_weights_bitwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    results = spawn_gloo_ranks(_worker, 2, tmp_path, monkeypatch)
    for precision, stage in CASES:
        ours, our_norms, our_calls, groups = results[(precision, stage, "kiln")]
        theirs, their_norms, their_calls, _ = results[(precision, stage, "deepspeed")]
        assert groups == 2  # weights with and without decay: two groups to combine
        assert their_calls == 3 * groups and our_calls == 3, (precision, stage)
        assert our_norms == their_norms and all(n > 0.05 for n in our_norms)  # clipped
        assert ours.keys() == theirs.keys()
        for name, value in ours.items():
            assert torch.equal(value, theirs[name]), (precision, stage, name)
