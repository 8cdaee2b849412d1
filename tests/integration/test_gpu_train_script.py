"""benchmarks/gpu_train.py on a machine without CUDA: it says the GPU part is skipped, runs
its CPU smoke configuration through kiln's real engine (synthetic batches, and `kiln train`
with the real loader), and prints one JSON line of figures. Plus the GPU peak table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.gpu_train import peak_bf16_tflops
from tests.helpers_benchmarks import run_benchmark
from tests.helpers_datasets import write_tiny_dataset

cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="tests the script's CPU fallback; this machine has CUDA"
)


def _run(*args: str) -> tuple[list[str], dict[str, Any]]:
    return run_benchmark("gpu_train.py", *args)


def _check_smoke(figures: dict[str, Any], mode: str) -> None:
    assert (figures["mode"], figures["gpu"], figures["smoke"]) == (mode, False, True)
    assert (figures["flavor"], figures["precision"], figures["zero_stage"]) == (
        "clip-tiny",
        "fp32",
        2,
    )
    assert (figures["world_size"], figures["warmup_steps"], figures["timed_steps"]) == (1, 2, 3)
    assert figures["samples_per_s"] > 0 and math.isfinite(figures["final_loss"])
    assert figures["samples_per_s"] == pytest.approx(8 / figures["step_s"], rel=1e-2)


@pytest.mark.slow
@cpu_only
def test_without_cuda_it_skips_the_gpu_part_and_runs_the_smoke_configuration() -> None:
    lines, figures = _run("--peak-tflops", "2")
    assert any(
        line.startswith("[kiln] no CUDA GPU") and "skipping the GPU benchmark" in line
        for line in lines
    ), lines
    _check_smoke(figures, "synthetic")
    # MFU = samples/s x training FLOPs per sample / peak, with kiln model info's FLOPs
    from kiln.models.config import ModelConfig
    from kiln.models.info import flops_per_sample

    train_flops = flops_per_sample(ModelConfig.model_validate({"flavor": "clip-tiny"}))["train"]
    assert figures["train_gflops_per_sample"] == round(train_flops / 1e9, 3)
    expected = figures["samples_per_s"] * train_flops / 2e12
    assert figures["mfu"] == pytest.approx(expected, rel=1e-2)
    assert figures["peak_source"] == "--peak-tflops"


@pytest.mark.slow
@cpu_only
def test_loader_mode_times_kiln_train_on_a_real_dataset(tmp_path: Path) -> None:
    dataset = write_tiny_dataset(tmp_path / "ds", num_samples=48)
    _, figures = _run("--mode", "loader", "--dataset", str(dataset), "--fast-decode")
    _check_smoke(figures, "loader")
    assert figures["fast_decode"] is True  # the recipe's data.fast_decode
    assert figures["mfu"] is None  # no GPU, no --peak-tflops: no peak to divide by


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
    ],
)
def test_peak_table_matches_the_most_specific_device_name(name: str, peak: float) -> None:
    found = peak_bf16_tflops(name)
    assert found is not None and found[0] == peak
    assert peak_bf16_tflops("Some Future Accelerator") is None
