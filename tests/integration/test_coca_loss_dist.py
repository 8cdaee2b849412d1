"""CoCa's loss over ranks equals one process's over the global batch, with real gloo.

At 2 and 3 ranks, each rank takes its share of one fixed global batch whose long captions
all sit on rank 0 (so the ranks hold different numbers of caption tokens), runs CoCa's
objective (contrastive + captioning) and backward; gradients are averaged over ranks as
DeepSpeed/DDP do. The loss (mean over ranks), the logged captioning loss and every gradient
must equal one process's over the whole batch, to float rounding. Control: the captioning
loss as each rank's mean over its own tokens (what kiln computed before, and OpenCLIP
does) does *not* equal the global token mean here, which shows the comparison can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kiln.models.config import ModelConfig
from kiln.models.tokenizer import PAD_ID, tokenize
from kiln.training.objectives import build_objective
from kiln.training.objectives.config import CocaObjectiveConfig
from tests.helpers_training import MICRO_MODEL, gloo_group, seeded_model, spawn_gloo_ranks

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 12
CFG = ModelConfig.model_validate({**MICRO_MODEL, "flavor": "coca-tiny"})
# longest first: rank 0's share holds the long captions
CAPTIONS = [("x" * k) for k in (10, 10, 9, 9, 8, 7, 5, 4, 3, 2, 1, 1)]


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "images": torch.randn(GLOBAL_BATCH, 3, CFG.image_size, CFG.image_size, generator=gen),
        "tokens": tokenize(CAPTIONS, CFG.context_length),
    }


def _loss(fields: dict[str, torch.Tensor]) -> dict[str, object]:
    """CoCa's objective and backward on `fields` in this process."""
    objective = build_objective(CocaObjectiveConfig())
    model = seeded_model(CFG)
    outputs = model(**objective.model_inputs(fields))
    loss, logs = objective.loss(outputs, fields)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    own_mean = F.cross_entropy(  # the control: this rank's own token mean
        outputs["caption_logits"].float().reshape(-1, outputs["caption_logits"].shape[-1]),
        outputs["caption_targets"].reshape(-1),
        ignore_index=PAD_ID,
    )
    return {
        "loss": loss.detach(),
        "caption": logs["caption_loss"],
        "grads": grads,
        "own_mean": own_mean.detach(),
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    with gloo_group(rank, world, port):
        n = GLOBAL_BATCH // world
        mine = {k: v[rank * n : (rank + 1) * n] for k, v in _batch().items()}
        result = _loss(mine)
        for name in ("loss", "caption", "own_mean"):
            value = result[name]
            assert isinstance(value, torch.Tensor)
            dist.all_reduce(value)
            result[name] = value / world
        tokens = (mine["tokens"] != PAD_ID).sum().reshape(1)
        counts = [torch.empty_like(tokens) for _ in range(world)]
        dist.all_gather(counts, tokens)
        result["token_counts"] = [int(c) for c in counts]
        grads = result["grads"]
        assert isinstance(grads, dict)
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
        if rank == 0:
            torch.save(result, out)


@pytest.mark.parametrize("world", [2, 3])
def test_coca_loss_equals_the_global_batch(
    world: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got = spawn_gloo_ranks(_worker, world, tmp_path, monkeypatch, world)
    assert len(set(got["token_counts"])) == world, got["token_counts"]  # uneven on purpose

    ref = _loss(_batch())
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["caption"], ref["caption"], rtol=1e-6, atol=1e-6)
    assert got["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) > 20
    for name, g in ref["grads"].items():
        err = (got["grads"][name] - g).abs().max() / g.abs().max().clamp(min=1e-6)
        assert err < 1e-5, (name, float(err))
    assert abs(float(got["own_mean"]) - float(ref["caption"])) > 1e-3
