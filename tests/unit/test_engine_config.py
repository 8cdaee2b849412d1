"""The DeepSpeed config kiln builds from a train recipe, on CPU and on GPU machines."""

from __future__ import annotations

import fcntl
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from kiln.training.config import TrainConfig
from kiln.training.engine import (
    align_params,
    build_ds_config,
    op_build_lock,
    optimizer_factory,
    set_runtime_env,
)
from kiln.training.optim import AdamW


def _cfg(**zero: object) -> TrainConfig:
    return TrainConfig.model_validate(
        {"data": {"dataset": "d", "batch_size": 8}, "optim": {"grad_accum": 2}, "zero": zero}
    )


def test_gpu_ranks_get_fused_adamw_and_bf16_cpu_ranks_keep_exact_fp32() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    gpu_build, cpu_build = (
        optimizer_factory(_cfg(), cuda=True),
        optimizer_factory(_cfg(), cuda=False),
    )
    assert gpu_build is not None and cpu_build is not None
    gpu_opt, cpu_opt = gpu_build(params), cpu_build(params)
    assert isinstance(gpu_opt, AdamW) and gpu_opt.defaults["fused"] is True
    assert isinstance(cpu_opt, AdamW) and not cpu_opt.defaults["fused"]
    assert cpu_opt.defaults["betas"] == (0.9, 0.98) and cpu_opt.defaults["eps"] == 1e-6
    gpu = build_ds_config(_cfg(), 4, cuda=True)
    assert "optimizer" not in gpu and gpu["bf16"]["enabled"] is True
    cpu = build_ds_config(_cfg(), 4, cuda=False)
    assert "optimizer" not in cpu and cpu["bf16"]["enabled"] is False
    assert build_ds_config(_cfg(precision="fp32"), 4, cuda=True)["bf16"]["enabled"] is False
    assert cpu["train_batch_size"] == 8 * 2 * 4


def test_bf16_parameters_start_on_16_bytes_in_zero_1_and_2() -> None:
    def aligned(cuda: bool, aligned: bool | None = None, **zero: object) -> bool:
        ds = build_ds_config(_cfg(**zero), 2, cuda=cuda, aligned=aligned)
        return bool(ds["zero_optimization"].get("parameter_alignment"))

    # auto: with bf16 parameters (GPU ranks, or precision bf16), in stages 1 and 2
    assert aligned(True) and aligned(True, stage=1) and aligned(False, precision="bf16")
    assert not aligned(False) and not aligned(True, precision="fp32")
    assert not aligned(True, stage=0) and not aligned(True, stage=3)
    # always / never; a resume's layout (`aligned`) wins over the recipe's choice
    assert aligned(False, align_params="always") and not aligned(True, align_params="never")
    assert not aligned(True, aligned=False) and aligned(False, aligned=True)
    assert not aligned(False, aligned=True, stage=3)  # stage 3 has no flat buffers to pad
    assert align_params(_cfg(), cuda=True) and not align_params(_cfg(), cuda=False)
    with pytest.raises(ValidationError, match=r"zero.align_params='always' needs ZeRO stage 1"):
        _cfg(stage=3, align_params="always")


def test_zero3_persistence_threshold_reaches_deepspeed() -> None:
    z = build_ds_config(_cfg(stage=3, param_persistence_threshold=0), 2, cuda=False)
    assert z["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}


def test_optimizer_offload_hands_deepspeed_its_cpu_adam_on_cpu_and_gpu() -> None:
    for cuda in (False, True):
        ds = build_ds_config(_cfg(stage=2, offload_optimizer="cpu"), 2, cuda=cuda)
        assert ds["zero_optimization"] == {
            "stage": 2,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            **({"parameter_alignment": True} if cuda else {}),  # bf16 parameters: aligned
        }
        # no torch_adam: DeepSpeed then builds DeepSpeedCPUAdam for the offloaded partition
        params = ds["optimizer"]["params"]
        assert "torch_adam" not in params and "fused" not in params
        assert ds["optimizer"]["type"] == "AdamW" and ds["bf16"]["enabled"] is cuda
        assert optimizer_factory(_cfg(stage=2, offload_optimizer="cpu"), cuda=cuda) is None


def test_zero3_offloads_parameters_and_optimizer_with_pinning_from_the_recipe() -> None:
    cfg = _cfg(stage=3, offload_optimizer="cpu", offload_param="cpu", offload_pin_memory=False)
    z = build_ds_config(cfg, 4, cuda=True)["zero_optimization"]
    assert z["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    # parameters alone: the optimizer stays torch's fused AdamW on the GPU
    alone = build_ds_config(_cfg(stage=3, offload_param="cpu"), 4, cuda=True)
    assert "offload_optimizer" not in alone["zero_optimization"]
    assert "optimizer" not in alone
    build = optimizer_factory(_cfg(stage=3, offload_param="cpu"), cuda=True)
    assert build is not None and build([torch.nn.Parameter(torch.zeros(2))]).defaults["fused"]


@pytest.mark.parametrize(
    ("zero", "needle"),
    [
        ({"stage": 2, "offload_param": "cpu"}, "offload_param='cpu' needs ZeRO stage 3"),
        ({"stage": 0, "offload_optimizer": "cpu"}, "needs ZeRO stage 1, 2 or 3"),
        ({"stage": 2, "offload_optimizer": "nvme"}, "offload_optimizer"),
    ],
)
def test_offload_needs_a_stage_that_partitions_what_it_offloads(
    zero: dict[str, object], needle: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(needle)):
        _cfg(**zero)


def test_op_build_lock_removes_a_killed_builds_lock_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch's build `lock` file outlives a killed build and blocks every later load; with
    kiln's flock held, such a file can only be a leftover: it is removed, saying so."""
    cache = tmp_path / "deepspeed_shm_comm"
    cache.mkdir()
    (cache / "lock").write_text("")
    with op_build_lock(cache):
        assert not (cache / "lock").exists()
    said = capsys.readouterr()
    assert "left by a build that was killed" in said.out + said.err


def test_op_build_lock_waits_for_a_live_builder_and_not_for_a_dead_one(tmp_path: Path) -> None:
    """A live kiln builder's flock makes the next one wait (its torch lock is left alone);
    the kernel drops the flock of a builder that is killed, so nothing waits on it."""
    cache = tmp_path / "op"
    cache.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(cache / '.kiln-build.lock')!r}, 'a')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            f"open({str(cache / 'lock')!r}, 'w').close()\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        entered = threading.Event()

        def build() -> None:
            with op_build_lock(cache):
                entered.set()

        waiter = threading.Thread(target=build, daemon=True)
        waiter.start()
        assert not entered.wait(2.0)  # the live builder holds it
        assert (cache / "lock").exists()  # and its torch lock is left alone
        holder.send_signal(signal.SIGKILL)  # killed mid-build: its flock goes with it
        holder.wait()
        assert entered.wait(30.0)
        waiter.join(30.0)
        assert not (cache / "lock").exists()
        with open(cache / ".kiln-build.lock", "a") as f:  # and kiln released its own
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        holder.kill()
        holder.wait()


def test_runtime_env_puts_kilns_ninja_first_on_path() -> None:
    """Every process (launcher, local ranks, Ray workers) builds ops with the same ninja:
    two versions rebuilt each other's DeepSpeed ops on every launch."""
    import ninja

    env = set_runtime_env({"PATH": f"/usr/bin:{ninja.BIN_DIR}:/bin"})
    assert env["PATH"].split(":") == [ninja.BIN_DIR, "/usr/bin", "/bin"]
    assert set_runtime_env(dict(env))["PATH"] == env["PATH"]  # idempotent
