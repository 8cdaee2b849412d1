"""benchmarks/gpu_step.py on a machine without CUDA: it says the GPU part is skipped and
runs its CPU smoke configuration (bf16, so DeepSpeed's per-gradient overflow scan runs in
its `deepspeed_overflow_scan` variant and not in kiln's), and prints one JSON line."""

from __future__ import annotations

import pytest
import torch

from tests.helpers_benchmarks import run_benchmark


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="tests the script's CPU fallback; this machine has CUDA"
)
def test_without_cuda_it_runs_the_smoke_configuration_with_each_overflow_check() -> None:
    lines, figures = run_benchmark("gpu_step.py")
    assert any(line.startswith("[kiln] no CUDA GPU") for line in lines), lines
    assert (figures["benchmark"], figures["gpu"], figures["smoke"]) == ("gpu_step", False, True)
    assert (figures["flavor"], figures["precision"], figures["batch"]) == ("clip-tiny", "bf16", 8)
    variants = figures["variants"]
    assert set(variants) == {"deepspeed_overflow_scan", "kiln", "plain_torch"}
    # DeepSpeed's own check scans the gradients once a step; kiln's leaves it to the norm
    assert variants["deepspeed_overflow_scan"]["overflow_scans_per_step"] == 1.0
    assert variants["kiln"]["overflow_scans_per_step"] == 0.0
    for v in variants.values():
        assert len(v["ms_per_step"]) == 1 and v["ms_per_step"][0] > 0
        assert v["median_samples_per_s"] > 0 and v["device_ops_per_step"] is None
    assert set(figures["hand_over"]) == {"float32_pageable", "uint8_pageable"}  # no pinning
    assert all(h["ms"] >= h["blocked_ms"] >= 0 for h in figures["hand_over"].values())
