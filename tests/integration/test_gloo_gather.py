"""All-gathers by broadcasts (`kiln.training.gloo_gather`) give exactly what torch's
gloo ``all_gather_into_tensor`` gives, with real gloo at 2 and 3 ranks and under real
DeepSpeed ZeRO-2 and ZeRO-3.

The gathers are bytes copied, so the comparison is bitwise. Each case also counts the
broadcasts it made: a test that compared torch's gather with itself could not fail.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from kiln.training import gloo_gather
from tests.helpers_training import (
    TINY_MODEL,
    gloo_group,
    leave_gloo_group,
    rank_env,
    spawn_gloo_ranks,
)

pytestmark = pytest.mark.slow


def _counting_broadcasts() -> list[int]:
    """Make this process's `dist.broadcast` count its calls (in the list returned)."""
    calls = [0]
    real = dist.broadcast

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    dist.broadcast = counted  # type: ignore[assignment]
    return calls


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    with gloo_group(rank, world, port):
        _gather_cases(rank, world, out)


def _gather_cases(rank: int, world: int, out: str) -> None:
    """Each way of gathering this file checks, on this rank; the last rank saves them."""
    calls = _counting_broadcasts()
    results: dict[str, Any] = {}

    def case(name: str, output: torch.Tensor, inp: torch.Tensor, group: Any = None) -> None:
        """Gather `inp` into `output` both ways (sync and async), compare with torch's."""
        expected = torch.empty_like(output)
        dist.all_gather_single(expected, inp.clone(), group=group)
        before = calls[0]
        gloo_gather.all_gather_into_tensor(output, inp, group=group)
        sync_ok = torch.equal(output, expected)
        again = torch.full_like(output, -1)
        handle = gloo_gather.all_gather_into_tensor(again, inp.clone(), group=group, async_op=True)
        handle.wait()
        results[name] = (sync_ok, torch.equal(again, expected), calls[0] - before)

    n = 1000
    gloo_gather.BROADCAST_MIN_BYTES = 0
    # ZeRO 1-2: each rank's input is its own slice of the output (updated in place)
    flat = torch.full((world * n,), -1.0)
    own = flat.narrow(0, rank * n, n)
    own.copy_(torch.arange(n, dtype=torch.float32) + 1000 * rank)
    case("slice_of_output", flat, own)
    # ZeRO-3: a separate input; bf16
    values = (torch.randn(n, generator=torch.Generator().manual_seed(rank))).to(torch.bfloat16)
    case("separate_bf16", torch.empty(world * n, dtype=torch.bfloat16), values)
    # a group of some ranks: broadcast roots are the members' global ranks
    members = list(range(1, world))
    group = dist.new_group(members)
    if rank in members:
        case("subgroup", torch.empty(len(members) * n), torch.full((n,), float(rank)), group)
    # below the threshold: torch's own gather, no broadcast
    gloo_gather.BROADCAST_MIN_BYTES = 16 * 2**20
    case("small", torch.empty(world * n), torch.full((n,), float(rank)))
    if rank == world - 1:
        torch.save(results, out)


@pytest.mark.parametrize("world", [2, 3])
def test_broadcast_gather_matches_torch_bitwise(
    world: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = spawn_gloo_ranks(_gather_worker, world, tmp_path, monkeypatch, world)
    for name in ("slice_of_output", "separate_bf16", "subgroup"):
        sync_ok, async_ok, broadcasts = results[name]
        assert sync_ok and async_ok, name
        members = world if name != "subgroup" else world - 1
        assert broadcasts == 2 * members, (name, broadcasts)  # one per member, sync + async
    sync_ok, async_ok, broadcasts = results["small"]
    assert sync_ok and async_ok and broadcasts == 0


def _zero_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(rank_env(rank, 2, port))
    torch.set_num_threads(1)
    from deepspeed.comm import comm as ds_comm

    from kiln.models.build import build_model
    from kiln.training.config import TrainConfig
    from kiln.training.engine import (
        build_ds_config,
        build_engine,
        import_deepspeed,
        init_distributed,
    )
    from tests.helpers_training import clip_loss_of, word_batch

    deepspeed = import_deepspeed()
    init_distributed()
    installed = ds_comm.cdb.all_gather_function is gloo_gather.all_gather_into_tensor
    calls = _counting_broadcasts()
    results: dict[str, Any] = {"installed": installed}
    for stage in (2, 3):
        cfg = TrainConfig.model_validate(
            {
                "data": {"dataset": "unused", "batch_size": 2},
                "model": TINY_MODEL,
                "optim": {"lr": 1e-2, "warmup_steps": 1},
                "zero": {"stage": stage, "param_persistence_threshold": 0}
                if stage == 3
                else {"stage": stage},
                "max_steps": 10,
            }
        )
        images, tokens = word_batch(cfg.model, ["red", "green", "blue", "pink"])
        for way, threshold in (("torch", 2**62), ("broadcasts", 0)):
            gloo_gather.BROADCAST_MIN_BYTES = threshold
            before = calls[0]
            torch.manual_seed(0)
            if stage == 3:
                with deepspeed.zero.Init(config_dict_or_path=build_ds_config(cfg, 2)):
                    model = build_model(cfg.model)
            else:
                model = build_model(cfg.model)
            engine = build_engine(model, cfg, 2)
            mine = slice(2 * rank, 2 * rank + 2)
            for _ in range(3):
                engine.backward(clip_loss_of(engine(images[mine], tokens[mine])))
                engine.step()
            params = list(model.parameters())
            with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
                weights = {n: p.detach().clone() for n, p in model.named_parameters()}
            results[(stage, way)] = (weights, calls[0] - before)
            engine.destroy()
    if rank == 0:
        torch.save(results, out)
    leave_gloo_group()


def test_zero_trains_the_same_weights_with_broadcast_gathers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    results = spawn_gloo_ranks(_zero_worker, 2, tmp_path, monkeypatch)
    assert results["installed"], "init_distributed did not route DeepSpeed's gathers"
    for stage in (2, 3):
        by_torch, torch_broadcasts = results[(stage, "torch")]
        by_broadcast, broadcasts = results[(stage, "broadcasts")]
        assert broadcasts > torch_broadcasts, (stage, broadcasts, torch_broadcasts)
        assert by_torch.keys() == by_broadcast.keys()
        for name, value in by_torch.items():
            assert torch.equal(value, by_broadcast[name]), (stage, name)
