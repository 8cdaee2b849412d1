"""kiln's AdamW steps CPU tensors slice by slice and must stay bitwise torch's AdamW."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kiln.training.optim import AdamW, slice_elements

KW = {"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.98), "eps": 1e-6}


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    """Sizes below, at and above one slice (and not a multiple of it), a parameter that is
    not contiguous, and a scalar."""
    g = torch.Generator().manual_seed(seed)
    n = slice_elements()
    flat = [torch.randn(k, generator=g) for k in (1, 1000, n, n + 1, 3 * n + 17)]
    transposed = torch.randn(640, 410, generator=g).t()  # 262,400 elements, strided
    assert not transposed.is_contiguous()
    return [torch.nn.Parameter(t) for t in [*flat, transposed, torch.randn((), generator=g)]]


def _groups(params: list[torch.nn.Parameter]) -> list[dict[str, object]]:
    return [{"params": params[:4]}, {"params": params[4:], "weight_decay": 0.0}]


def _grads(params: list[torch.nn.Parameter], step: int) -> Iterator[torch.Tensor | None]:
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        # parameter 1 has no gradient on odd steps (it is skipped, its step count stays)
        yield None if (i == 1 and step % 2) else torch.randn(p.shape, generator=g)


def _train(opt_cls: type[torch.optim.Optimizer], steps: int = 5, **kw: object) -> tuple:
    params = _params()
    opt = opt_cls(_groups(params), **{**KW, **kw})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for step in range(steps):
        for p, grad in zip(params, _grads(params, step), strict=True):
            p.grad = grad
        opt.step()
        sched.step()
    return params, opt


def _assert_same(a: tuple, b: tuple) -> None:
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for key, state in sa["state"].items():
        other = sb["state"][key]
        assert state.keys() == other.keys()
        for name, value in state.items():
            assert value.dtype == other[name].dtype, name
            assert torch.equal(value, other[name]), name


def test_sliced_steps_are_bitwise_torchs_adamw() -> None:
    kiln = _train(AdamW)
    assert kiln[1]._sliceable()  # the sliced path ran, not torch's
    _assert_same(kiln, _train(torch.optim.AdamW))


@pytest.mark.parametrize("threads", [2, 3])
def test_bitwise_with_several_torch_threads(threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _assert_same(_train(AdamW, steps=3), _train(torch.optim.AdamW, steps=3))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("option", [{"amsgrad": True}, {"maximize": True}, {"foreach": True}])
def test_options_it_does_not_slice_run_torchs_step(option: dict[str, object]) -> None:
    kiln = _train(AdamW, steps=3, **option)
    assert not kiln[1]._sliceable()
    _assert_same(kiln, _train(torch.optim.AdamW, steps=3, **option))


def test_resumes_from_torchs_state_dict_and_torch_from_its() -> None:
    """A checkpoint written by either optimizer continues bitwise in the other."""
    params_a, torch_opt = _train(torch.optim.AdamW, steps=2)
    params_b, kiln_opt = _train(AdamW, steps=2)
    swapped_a = AdamW(_groups(params_a), **KW)
    swapped_a.load_state_dict(torch_opt.state_dict())
    swapped_b = torch.optim.AdamW(_groups(params_b), **KW)
    swapped_b.load_state_dict(kiln_opt.state_dict())
    for step in (2, 3):
        for opt, params in ((swapped_a, params_a), (swapped_b, params_b)):
            for p, grad in zip(params, _grads(params, step), strict=True):
                p.grad = grad
            opt.step()
    _assert_same((params_a, swapped_a), (params_b, swapped_b))


def test_closure_is_evaluated_with_grad_and_its_loss_returned() -> None:
    w = torch.nn.Parameter(torch.ones(4))
    opt = AdamW([w], **KW)

    def closure() -> float:
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        return float(loss.detach())

    assert opt.step(closure) == 4.0
    assert bool((w < 1).all())
