"""ZeRO-3 in fp32 keeps one copy of each rank's parameter partition, not two: DeepSpeed's
master partition is the parameter partition itself (kiln's fix of DeepSpeed's device test,
`kiln.training.deepspeed_patches._patch_zero3_fp32_master`), and the optimizer step still moves the
weights the model computes with. In bf16 the fp32 master stays a separate copy, as it must.
Real DeepSpeed, one gloo rank in this process."""

from __future__ import annotations

import pytest
import torch

from kiln.models.build import build_model
from kiln.training.config import TrainConfig
from kiln.training.engine import build_ds_config, build_engine, import_deepspeed, init_distributed
from tests.helpers_training import MICRO_MODEL, clip_loss_of, word_batch


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_master_partition_is_the_parameter_partition_in_fp32(
    precision: str, single_rank: None
) -> None:
    cfg = TrainConfig.model_validate(
        {
            "data": {"dataset": "unused", "batch_size": 4},
            "model": MICRO_MODEL,
            "zero": {"stage": 3, "precision": precision, "param_persistence_threshold": 0},
        }
    )
    init_distributed()
    torch.manual_seed(0)
    with import_deepspeed().zero.Init(config_dict_or_path=build_ds_config(cfg, 1, cuda=False)):
        model = build_model(cfg.model)
    engine = build_engine(model, cfg, 1)
    opt = engine.optimizer
    pairs = list(
        zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat, strict=True)
    )
    shared = [p.untyped_storage().data_ptr() == m.untyped_storage().data_ptr() for p, m in pairs]
    assert shared == [precision == "fp32"] * len(pairs)

    before = [p.ds_tensor.detach().float().clone() for p in model.parameters()]
    images, tokens = word_batch(cfg.model, ["red", "green", "blue", "pink"])
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    engine.backward(clip_loss_of(engine(images.to(dtype), tokens)))
    engine.step()
    moved = [
        not torch.equal(b, p.ds_tensor.float())
        for b, p in zip(before, model.parameters(), strict=True)
    ]
    assert sum(moved) > len(moved) // 2  # the step reached the partitions the model uses
    for flat, master in pairs:
        torch.testing.assert_close(flat.float(), master.float(), rtol=0.01, atol=1e-2)
    engine.destroy()
