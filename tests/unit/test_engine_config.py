"""The DeepSpeed config kiln builds from a train recipe, on CPU and on GPU machines."""

from __future__ import annotations

from kiln.training.config import TrainConfig
from kiln.training.engine import build_ds_config


def _cfg(**zero: object) -> TrainConfig:
    return TrainConfig.model_validate(
        {"data": {"dataset": "d", "batch_size": 8}, "optim": {"grad_accum": 2}, "zero": zero}
    )


def test_gpu_ranks_get_fused_adamw_and_bf16_cpu_ranks_keep_exact_fp32() -> None:
    gpu = build_ds_config(_cfg(), 4, cuda=True)
    assert gpu["optimizer"]["params"]["fused"] is True and gpu["bf16"]["enabled"] is True
    cpu = build_ds_config(_cfg(), 4, cuda=False)
    assert "fused" not in cpu["optimizer"]["params"] and cpu["bf16"]["enabled"] is False
    assert cpu["optimizer"]["params"]["torch_adam"] is True
    assert build_ds_config(_cfg(precision="fp32"), 4, cuda=True)["bf16"]["enabled"] is False
    assert cpu["train_batch_size"] == 8 * 2 * 4


def test_zero3_persistence_threshold_reaches_deepspeed() -> None:
    z = build_ds_config(_cfg(stage=3, param_persistence_threshold=0), 2, cuda=False)
    assert z["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
