"""`kiln.models.gemm.linear`: oneDNN for CPU fp32 products, torch's `F.linear` for the rest.

The oneDNN path must be `F.linear`'s contract at fp32 rounding (forward and all three
gradients, against a float64 reference), deterministic, and taken only where the module
says; `KILN_CPU_GEMM=torch` must give torch's numbers bitwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.models import gemm
from kiln.models.gemm import MIN_MACS, cpu_gemm, linear, set_cpu_gemm

pytestmark = pytest.mark.skipif(
    gemm._op() is None, reason="this torch has no oneDNN linear op (the torch path is all there is)"
)


@pytest.fixture(autouse=True)
def _onednn() -> object:
    set_cpu_gemm("onednn")
    yield
    gemm._choice = None  # back to KILN_CPU_GEMM / the default


def _inputs(shape: tuple[int, ...], out: int, *, transpose: bool = False, bias: bool = True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    if transpose:  # a non-contiguous input
        x = x.t()
    w = torch.randn(out, x.shape[-1], generator=g)
    b = torch.randn(out, generator=g) if bias else None
    return x, w, b


def _grads(fn, x, w, b, grad_out=None):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    y = fn(*leaves) if b is not None else fn(*leaves, None)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(g.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize(
    ("shape", "out", "transpose", "bias"),
    [
        ((8, 50, 96), 288, False, True),  # [B, n, width] -> qkv
        ((400, 96), 384, False, False),  # 2-D, no bias
        ((96, 400), 128, True, True),  # a transposed (non-contiguous) input
    ],
)
def test_matches_float64_reference_like_torch(shape, out, transpose, bias) -> None:
    x, w, b = _inputs(shape, out, transpose=transpose, bias=bias)
    assert x.numel() * out >= MIN_MACS
    y, grads = _grads(linear, x, w, b)
    ref_y, ref_grads = _grads(F.linear, *(t.double() if t is not None else None for t in (x, w, b)))
    torch_y, torch_grads = _grads(F.linear, x, w, b)
    # fp32 rounding: within a few times torch's own (MKL's) distance to float64, which
    # reduced precision (bf16/tf32, errors ~1e-3 relative) would be far outside
    for mine, theirs, ref in zip(
        [y, *grads], [torch_y, *torch_grads], [ref_y, *ref_grads], strict=True
    ):
        scale = ref.abs().max().item()
        mine_err = (mine.double() - ref).abs().max().item()
        torch_err = (theirs.double() - ref).abs().max().item()
        assert mine_err <= 4 * torch_err + 1e-7 * scale, (mine_err, torch_err)
        assert mine_err <= 1e-5 * scale


def test_takes_onednn_only_where_it_should() -> None:
    x, w, b = _inputs((8, 50, 96), 288)
    x.requires_grad_()
    assert cpu_gemm() == "onednn"
    assert type(linear(x, w, b).grad_fn).__name__ == "_OneDNNLinearBackward"
    small = torch.randn(4, 96, requires_grad=True)  # 4 * 96 * 288 multiply-adds < MIN_MACS
    assert type(linear(small, w, b).grad_fn).__name__ != "_OneDNNLinearBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: torch's kernel, bf16 out
        assert linear(x, w, b).dtype == torch.bfloat16
    assert linear(x.double(), w.double(), b.double()).dtype == torch.float64
    with torch.no_grad():  # inference: the product alone, no autograd node
        assert linear(x, w, b).grad_fn is None


def test_deterministic_and_torch_choice_is_bitwise_torch() -> None:
    x, w, b = _inputs((8, 50, 96), 288)
    first, first_grads = _grads(linear, x, w, b)
    for _ in range(3):
        again, again_grads = _grads(linear, x, w, b)
        assert torch.equal(first, again)
        assert all(torch.equal(p, q) for p, q in zip(first_grads, again_grads, strict=True))
    set_cpu_gemm("torch")
    mine, mine_grads = _grads(linear, x, w, b)
    theirs, their_grads = _grads(F.linear, x, w, b)
    assert torch.equal(mine, theirs)
    assert all(torch.equal(p, q) for p, q in zip(mine_grads, their_grads, strict=True))


def test_model_step_matches_torch_kernel() -> None:
    """A whole tiny CLIP step: loss and every gradient as with torch's kernel, to rounding."""
    from kiln.models.build import build_model
    from kiln.models.config import ModelConfig

    def step(choice: str) -> tuple[float, dict[str, torch.Tensor]]:
        set_cpu_gemm(choice)
        torch.manual_seed(0)
        model = build_model(ModelConfig.model_validate({"flavor": "clip-tiny"}))
        g = torch.Generator().manual_seed(0)
        images = torch.randn(16, 3, 32, 32, generator=g)
        tokens = torch.randint(3, 258, (16, 48), generator=g)
        out = model(images, tokens)
        logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T
        labels = torch.arange(16)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}

    loss, grads = step("onednn")
    ref_loss, ref_grads = step("torch")
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-6, msg=name)


def test_choice_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="not one of onednn, torch"):
        set_cpu_gemm("mkl")
    gemm._choice = None
    monkeypatch.setenv("KILN_CPU_GEMM", "torch")
    assert cpu_gemm() == "torch"
    gemm._choice = None
    monkeypatch.setenv("KILN_CPU_GEMM", "openblas")
    with pytest.raises(ValueError, match="KILN_CPU_GEMM='openblas' is not one of onednn, torch"):
        cpu_gemm()
