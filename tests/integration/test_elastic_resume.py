"""Elastic resume: a run checkpointed by N ranks continues on M != N ranks (real DeepSpeed,
2 gloo ranks at most, CPU fp32, local launcher).

ZeRO 1-3 go through DeepSpeed's universal checkpoint (`ds_to_universal`, made once per tag);
ZeRO-0 checkpoints hold whole states and load as they are. What must hold:

- the first step after an elastic resume has the loss that the checkpoint's own weights
  give on the global batch the resumed loaders hand out (so the weights and the loader
  position carried over; the loader's no-repeat/no-skip guarantee over the
  epoch is tested on sample uids in tests/unit/test_loader.py);
- the run trains on to max_steps at the new size, through 2 -> 1 -> 2 (ZeRO-2) and
  2 -> 1 -> 4 (ZeRO-3);
- the universal form holds the same weights and Adam moments the engine had (loaded at the
  same world size, every tensor is equal).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.training import train
from kiln.training.checkpoint import (
    UNIVERSAL_DIR,
    checkpoints_dir,
    load_checkpoint,
    prepare_resume,
    read_complete_marker,
    save_checkpoint,
    tag_for_step,
)
from kiln.training.config import TrainConfig
from kiln.training.data import WebDatasetLoader
from kiln.training.evaluate import load_model_file
from kiln.training.objectives import build_objective
from tests.helpers_datasets import write_tiny_dataset
from tests.helpers_training import TINY_MODEL, last_loss_per_step

MAX_STEPS = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_dataset(tmp_path_factory.mktemp("elastic") / "ds", num_samples=64))


def _config(
    dataset: str, stage: int, stop_after: int | None = None, align: str = "auto"
) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {"dataset": dataset, "batch_size": 4, "num_workers": 1, "shuffle_buffer": 8},
            "model": TINY_MODEL,
            "optim": {"lr": 2e-3, "warmup_steps": 2},
            "zero": {
                "stage": stage,
                "param_persistence_threshold": 0,
                "align_params": align,
            },
            "checkpoint": {"every_steps": 2, "keep_last": 3},
            "max_steps": MAX_STEPS,
            "stop_after_step": stop_after,
            "seed": 3,
        }
    )


def _first_step_loss_from_checkpoint(cfg: TrainConfig, run: Path, step: int, world: int) -> float:
    """Global loss of step `step + 1` on `world` ranks, computed in this process from
    checkpoint `step`'s consolidated weights and loader position: the ranks' first batches
    after the resume, concatenated in rank order, are one global CLIP batch."""
    tag_dir = checkpoints_dir(run) / tag_for_step(step)
    model, _, _ = load_model_file(str(tag_dir / "model.pt"))
    # every rank's model-states file holds the client state (ZeRO-3 names them per rank)
    states = torch.load(sorted(tag_dir.glob("*model_states.pt"))[0], weights_only=False)
    objective = build_objective(cfg.objective)  # type: ignore[arg-type]
    parts = []
    for rank in range(world):
        loader = WebDatasetLoader.from_config(cfg, rank=rank, world_size=world)
        loader.load_state_dict(states["kiln"]["loader"])
        it = iter(loader)
        parts.append(next(it))
        it.close()  # type: ignore[attr-defined]
    # each rank's model input (`Batch.to`: its pixels normalized), in rank order
    inputs = [b.to("cpu", torch.float32, objective.batch_fields) for b in parts]
    fields = {name: torch.cat([x[name] for x in inputs]) for name in objective.batch_fields}
    with torch.no_grad():
        loss, _ = objective.loss(model(**objective.model_inputs(fields)), fields)
    return float(loss)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "align"),
    [(2, "auto"), (2, "always"), (3, "auto")],
    ids=["zero2", "zero2-aligned", "zero3"],
)
def test_resume_onto_another_world_size(
    stage: int, align: str, dataset: str, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cfg = _config(dataset, stage, stop_after=4, align=align)
    first = train(cfg, str(run), num_workers=2, launcher="local")
    assert first.last_step == 4
    assert read_complete_marker(run, tag_for_step(4))["world_size"] == 2

    # 2 -> 1: the first step's loss is the checkpoint's weights on the loader's next batch
    cfg = _config(dataset, stage, stop_after=6, align=align)
    down = train(cfg, str(run), num_workers=1, launcher="local", resume=True)
    assert (down.resumed_from, down.first_step, down.last_step) == (4, 5, 6)
    assert (checkpoints_dir(run) / tag_for_step(4) / UNIVERSAL_DIR).is_dir()
    assert down.losses[0] == pytest.approx(
        _first_step_loss_from_checkpoint(cfg, run, 4, 1), rel=1e-5
    )
    assert read_complete_marker(run, tag_for_step(6))["world_size"] == 1

    # 1 -> 2 (ZeRO-2) or 1 -> 4 (ZeRO-3), to the end
    world = 2 if stage == 2 else 4
    cfg = _config(dataset, stage, align=align)
    up = train(cfg, str(run), num_workers=world, launcher="local", resume=True)
    assert (up.resumed_from, up.last_step) == (6, MAX_STEPS)
    assert up.losses[0] == pytest.approx(
        _first_step_loss_from_checkpoint(cfg, run, 6, world), rel=1e-5
    )
    assert all(math.isfinite(x) for x in up.losses)
    assert sorted(last_loss_per_step(run)) == list(range(1, MAX_STEPS + 1))


@pytest.mark.slow
def test_zero0_resumes_onto_another_world_size_without_conversion(
    dataset: str, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    train(_config(dataset, 0, stop_after=4), str(run), num_workers=2, launcher="local")
    cfg = _config(dataset, 0, stop_after=5)
    down = train(cfg, str(run), num_workers=1, launcher="local", resume=True)
    assert (down.resumed_from, down.last_step) == (4, 5)
    assert not (checkpoints_dir(run) / tag_for_step(4) / UNIVERSAL_DIR).exists()
    assert down.losses[0] == pytest.approx(
        _first_step_loss_from_checkpoint(cfg, run, 4, 1), rel=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize("align", ["auto", "always"])
def test_universal_form_holds_the_engines_weights_and_adam_moments(
    align: str, tmp_path: Path, single_rank: None
) -> None:
    """Saved by 1 rank, converted, loaded by 1 rank through the universal path: every
    weight and both Adam moments of every parameter come back equal (also from and into
    flat buffers with each parameter padded to 16 bytes)."""
    from kiln.models.build import build_model
    from kiln.training.engine import build_engine, init_distributed
    from tests.helpers_training import word_batch

    cfg = _config("unused", 2, align=align)
    init_distributed()

    def engine(universal: bool) -> Any:
        torch.manual_seed(0)
        return build_engine(build_model(cfg.model), cfg, 1, load_universal=universal)

    def state(e: Any) -> dict[str, torch.Tensor]:
        """Each parameter group's flat fp32 partition and its Adam moments (1 rank: the
        partition is the whole group)."""
        opt, out = e.optimizer, {}
        for i, flat in enumerate(opt.single_partition_of_fp32_groups):
            out[f"{i}/fp32"] = flat.detach().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{i}/{key}"] = opt.optimizer.state[flat][key].clone()
        return out

    trained = engine(False)
    images, tokens = word_batch(cfg.model, ["cat", "dog", "ship"])
    for _ in range(2):
        out = trained(images, tokens)
        loss, _ = build_objective(cfg.objective).loss(out, {})  # type: ignore[arg-type]
        trained.backward(loss)
        trained.step()
    run = tmp_path / "run"
    tag = save_checkpoint(
        trained,
        run,
        step=2,
        client_state={"kiln": {"step": 2}},
        model_config=cfg.model,
        keep_last=1,
    )
    before = state(trained)

    # force the universal path at the same world size by pretending 2 ranks wrote it
    marker = checkpoints_dir(run) / tag / "COMPLETE"
    data = json.loads(marker.read_text())
    marker.write_text(json.dumps({**data, "world_size": 2}))
    assert prepare_resume(run, tag, zero_stage=2, model=cfg.model, log=print)
    loaded = engine(True)
    assert load_checkpoint(loaded, run, tag, seed=3)["kiln"] == {"step": 2}
    after = state(loaded)
    assert before.keys() == after.keys() and len(before) == 6
    for key, tensor in before.items():
        assert torch.equal(tensor, after[key]), key
