"""A rank's start pays only for what kiln trains with: building a real DeepSpeed ZeRO-2
engine and taking a step never loads TorchInductor (DeepSpeed's Muon module compiles its
kernels when imported; kiln makes that compile wait for Muon's first use,
`kiln.training.deepspeed_patches._patch_lazy_compile`). A fresh interpreter, since another test in
this process may have loaded Inductor already."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
import torch
from kiln.models.build import build_model
from kiln.training.config import TrainConfig
from kiln.training.engine import build_engine, init_distributed
from tests.helpers_training import MICRO_MODEL, clip_loss_of

cfg = TrainConfig.model_validate(
    {"data": {"dataset": "unused", "batch_size": 2}, "model": MICRO_MODEL, "zero": {"stage": 2}}
)
init_distributed()
torch.manual_seed(0)
engine = build_engine(build_model(cfg.model), cfg, 1)
size = cfg.model.vision.image_size
images = torch.randn(2, 3, size, size)
tokens = torch.randint(3, 200, (2, cfg.model.text.context_length))
engine.backward(clip_loss_of(engine(images, tokens)))
engine.step()
from deepspeed.runtime.zero.muon import original_muon
print("MUON_LAZY", hasattr(original_muon.muon_update, "__wrapped__"))
print("INDUCTOR", "torch._inductor.compile_fx" in sys.modules)
"""


@pytest.mark.slow
def test_a_zero2_step_never_loads_torch_inductor() -> None:
    from tests.helpers_training import one_rank_env

    env = one_rank_env()
    env.pop("LOCAL_SIZE", None)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MUON_LAZY True" in out.stdout  # Muon is there, compiled on its first call
    assert "INDUCTOR False" in out.stdout, out.stdout
