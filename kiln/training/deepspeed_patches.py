"""kiln's fixes to DeepSpeed's behaviour, applied once when kiln imports DeepSpeed
(`kiln.training.engine.import_deepspeed`).

Each patch is idempotent, keeps DeepSpeed's numbers, and says which DeepSpeed code it
changes and why; each has a test that fails without it. They target DeepSpeed 0.19 (the
pyproject floor), and each one steps aside where the code it replaces is not there.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import torch

from kiln.training.optim import AdamW

__all__ = ["apply_patches"]


def apply_patches(deepspeed: ModuleType) -> None:
    """Apply every patch below to the imported `deepspeed` module."""
    _patch_lazy_compile(deepspeed)
    _patch_scalar_broadcast(deepspeed)
    _patch_zero3_fp32_master(deepspeed)
    _patch_redundant_overflow_scan(deepspeed)
    _patch_one_norm_all_reduce(deepspeed)
    _register_zero_optimizer()


def _register_zero_optimizer() -> None:
    """List kiln's AdamW among the optimizers DeepSpeed's ZeRO has tested.

    ZeRO checks the optimizer's exact type against that list (``type(opt) in ...``, not
    ``isinstance``), so torch's AdamW passes and kiln's subclass of it, with the same
    numbers, would put "untested optimizer, proceed with caution" in every rank-0 log.
    DeepSpeed appends to the same list for its own Muon. Idempotent."""
    from deepspeed.runtime.zero import utils

    if AdamW not in utils.ZERO_SUPPORTED_OPTIMIZERS:
        utils.ZERO_SUPPORTED_OPTIMIZERS.append(AdamW)


def _patch_lazy_compile(deepspeed: ModuleType) -> None:
    """Make DeepSpeed's ``compiler.compile()`` decorator compile on first call, not at import.

    ``deepspeed.initialize`` and ZeRO's gradient reduction import DeepSpeed's Muon optimizer
    module (to check whether the optimizer is Muon), and that import runs ``torch.compile`` on
    three kernels, which loads TorchInductor: 2.7 s of every rank's start on a CPU core, for an
    optimizer kiln never uses. Muon is only that decorator's user; with the patch its kernels
    are compiled by ``torch.compile`` when first run. Idempotent; must run before Muon's import.
    """
    compiler = deepspeed.runtime.compiler
    if getattr(compiler.compile, "_kiln_lazy", False):
        return

    def compile() -> Any:
        def decorate(fn: Any) -> Any:
            compiled: Any = None

            @functools.wraps(fn)
            def run(*args: Any, **kwargs: Any) -> Any:
                nonlocal compiled
                if compiled is None:
                    compiled = torch.compile(fn)
                return compiled(*args, **kwargs)

            return run

        return decorate

    compile._kiln_lazy = True  # type: ignore[attr-defined]
    compiler.compile = compile


def _patch_scalar_broadcast(deepspeed: ModuleType) -> None:
    """Let DeepSpeed's initial weight broadcast handle 0-dim parameters (CLIP's logit_scale).

    DeepSpeed 0.19's ``DeepSpeedEngine._broadcast_model`` broadcasts ``p.data.view(uint8)``,
    which raises for 0-dim tensors. While it runs, each 0-dim parameter's ``.data`` is a
    1-element view of the same storage (so the broadcast still lands in the parameter),
    then the original tensor is put back. Idempotent; a no-op once DeepSpeed fixes it.
    """
    engine_cls = deepspeed.runtime.engine.DeepSpeedEngine
    original = getattr(engine_cls, "_broadcast_model", None)
    if original is None or getattr(original, "_kiln_scalar_safe", False):
        return

    def _broadcast_model(self: Any) -> None:
        scalars = [p for p in self.module.parameters() if p.dim() == 0]
        saved = [p.data for p in scalars]
        for p in scalars:
            p.data = p.data.view(1)
        try:
            original(self)
        finally:
            for p, data in zip(scalars, saved, strict=True):
                p.data = data

    _broadcast_model._kiln_scalar_safe = True  # type: ignore[attr-defined]
    engine_cls._broadcast_model = _broadcast_model


def _patch_zero3_fp32_master(deepspeed: ModuleType) -> None:
    """ZeRO-3 with fp32 parameters: let the rank's partition of the parameters be the fp32
    master partition itself, as DeepSpeed intends, instead of a second copy of it.

    DeepSpeed 0.19's ``DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions`` aliases the
    master partition to the parameter partition when that is already in the master dtype
    on the optimizer's device, but tests it with ``tensor.device == self.device``, where
    ``self.device`` is a string (``get_accelerator().current_device_name()``) and a
    ``torch.device`` never equals a string: it always clones, so every fp32 ZeRO-3 rank
    held its parameter partition twice (per-rank parameters + optimizer state 4/3 of 1/N of
    ZeRO-0's). While that method runs, ``self.device`` is made a ``torch.device``, so the
    test holds and DeepSpeed's own alias branch runs (after each step it copies master ->
    partition with ``.data.copy_``, a no-op on an alias, as its comment there says).
    Values and losses are unchanged (the copy was exact). bf16 runs (different dtype) and
    optimizer offload (its own branch, a CPU copy) are unaffected. Idempotent.
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    cls: Any = DeepSpeedZeroOptimizer_Stage3
    original = getattr(cls, "_create_fp32_partitions", None)
    if original is None or getattr(original, "_kiln_fp32_alias", False):
        return

    def _create_fp32_partitions(self: Any) -> None:
        saved = self.device
        if isinstance(saved, str) and not self.offload_optimizer:
            self.device = torch.device(saved)
        try:
            original(self)
        finally:
            self.device = saved

    _create_fp32_partitions._kiln_fp32_alias = True  # type: ignore[attr-defined]
    cls._create_fp32_partitions = _create_fp32_partitions


def _patch_redundant_overflow_scan(deepspeed: ModuleType) -> None:
    """ZeRO 1-2: skip the per-gradient inf/NaN scan when the step's global gradient norm,
    which DeepSpeed then tests for the same thing, is computed anyway.

    ``DeepSpeedZeroOptimizer.step`` first scans every gradient of the rank's partition for
    inf/NaN (``has_overflow``: ``amax``, ``amin``, two ``isfinite``, ``and``, ``not`` and an
    ``add`` per gradient, then an all-reduce and a host sync), then, with
    ``compute_grad_norm`` (DeepSpeed's default; kiln never turns it off), computes the global
    gradient norm and marks the step an overflow when that norm is not finite. A gradient
    holding an inf or NaN makes its own norm, and so the global one, inf or NaN (and a NaN
    anywhere is masked to DeepSpeed's invalid-norm sentinel), so the scan finds no step the
    norm test would not: the same steps are skipped, with the same gradient norm (inf)
    recorded for them. DeepSpeed itself leaves the test to the norm alone in fp32 (it turns
    the scan on for bf16 and fp16 only). The scan is 7 kernel launches per parameter: a
    ViT-B/16 CLIP step on an H200 ran 7,014 CUDA kernels and copies with it and 2,869
    without, and took 132-142 ms instead of 159-200, being bound by the CPU launching them
    (``benchmarks/gpu_step.py``).

    Left as DeepSpeed has it: with the optimizer offloaded (its overflow flag is gathered
    while gradients are copied to the CPU, so it costs nothing) and without
    ``compute_grad_norm``. (With ``bf16.check_grad_overflow: false`` DeepSpeed runs neither
    test and never calls this.)
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    cls: Any = DeepSpeedZeroOptimizer
    original = getattr(cls, "check_overflow", None)
    if original is None or getattr(original, "_kiln_norm_decides", False):
        return

    def check_overflow(self: Any, partition_gradients: bool = True) -> None:
        if getattr(self, "compute_grad_norm", False) and not self.cpu_offload:
            self.overflow = False  # step() tests the global norm next
            return
        original(self, partition_gradients)

    check_overflow._kiln_norm_decides = True  # type: ignore[attr-defined]
    check_overflow._kiln_original = original  # type: ignore[attr-defined]
    cls.check_overflow = check_overflow


def _patch_one_norm_all_reduce(deepspeed: ModuleType) -> None:
    """ZeRO 1-2: one all-reduce for the global gradient norm, not one per parameter group.

    ``DeepSpeedZeroOptimizer.scaled_global_norm`` calls ``get_grad_norm_direct`` for each
    parameter group, and each call all-reduces its group's sum of squared gradient norms
    over the data-parallel group, with a host sync on a GPU. kiln's optimizer has two groups
    (weights with and without decay), so every step paid two collectives where one carries
    both sums. The sums, the root, the inf/NaN masking and the combination are DeepSpeed's
    own, term for term (fp64 per-gradient norms, `get_norm_dtype`), on a two-element tensor
    instead of two scalars: an element-wise all-reduce sums each element as it would sum
    the scalar, so the norm, the clipping and every weight are bitwise the same. On 2 CPU
    ranks a gloo collective costs about a millisecond of wall time and 0.6 ms of CPU a call
    even when no rank is late (`benchmarks/README.md`, "Fewer collectives a step").

    Left as DeepSpeed has it: a norm other than L2, the optimizer offloaded (another code
    path), MoE layers, model or pipeline parallelism, and Muon groups needing their loss
    scale back.
    """
    from deepspeed.comm import pg_utils
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    cls: Any = DeepSpeedZeroOptimizer
    original = getattr(cls, "scaled_global_norm", None)
    if original is None or getattr(original, "_kiln_one_all_reduce", False):
        return
    if not hasattr(cls, "_muon_update_lacks_loss_scale"):  # not the 0.19 code this mirrors
        return

    def stock_path(self: Any, norm_type: float) -> bool:
        return bool(
            norm_type != 2
            or self.cpu_offload
            or self.has_moe_layers
            or getattr(self, "model_parallel_rank", 0) != 0
            or pg_utils.is_parallel(self.model_parallel_group)
            or any(self._muon_update_lacks_loss_scale(i) for i in range(len(self.bit16_groups)))
        )

    def scaled_global_norm(self: Any, norm_type: float = 2) -> torch.Tensor:
        if stock_path(self, norm_type):
            return original(self, norm_type)
        from deepspeed import comm as dist
        from deepspeed.accelerator import get_accelerator
        from deepspeed.runtime.constants import PIPE_REPLICATED
        from deepspeed.runtime.utils import (
            combine_grad_norm_groups,
            mask_nan_or_inf_with_val_inplace,
        )
        from deepspeed.runtime.zero.utils import get_norm_dtype

        norm_type = float(norm_type)
        device = get_accelerator().current_device_name()
        sums = []
        for i in range(len(self.bit16_groups)):  # get_grad_norm_direct's local part
            grads = (
                g for g in self.averaged_gradients[i] if not getattr(g, "_zero_padding", False)
            )
            norms = [
                torch.linalg.vector_norm(g.data.to(get_norm_dtype()).detach(), ord=norm_type).to(
                    device
                )
                for g, p in zip(grads, self.params_in_partition[i], strict=False)
                if not (hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated)
            ]
            if norms:
                sums.append(torch.stack(norms).pow(norm_type).sum().float())
            else:
                sums.append(torch.tensor(0.0, dtype=torch.float32).to(self.device))
        total = torch.stack(sums)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
        total = total.pow(1.0 / norm_type)
        mask_nan_or_inf_with_val_inplace(total, device=self.device)
        return combine_grad_norm_groups(list(total.unbind()), norm_type=norm_type)

    scaled_global_norm._kiln_one_all_reduce = True  # type: ignore[attr-defined]
    scaled_global_norm._kiln_original = original  # type: ignore[attr-defined]
    cls.scaled_global_norm = scaled_global_norm
