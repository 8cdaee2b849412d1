"""Checkpoint atomicity: COMPLETE markers, the `latest` pointer, pruning, a real save/load."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kiln import storage
from kiln.models.config import ModelConfig
from kiln.training.checkpoint import (
    COMPLETE_MARKER,
    checkpoints_dir,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resume_checkpoint,
    save_checkpoint,
    step_of_tag,
    tag_for_step,
    verify_checkpoint,
)
from kiln.training.config import TrainConfig
from tests.helpers_training import clip_loss_of


def fake_checkpoint(run: Path, step: int, *, complete: bool = True) -> str:
    tag = tag_for_step(step)
    d = checkpoints_dir(run) / tag
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    return tag


def point_latest(run: Path, tag: str) -> None:
    storage.atomic_write(checkpoints_dir(run) / "latest", (tag + "\n").encode())


def test_tags_round_trip() -> None:
    assert tag_for_step(12) == "step_00000012"
    assert step_of_tag("step_00000012") == 12
    assert step_of_tag("latest") is None and step_of_tag("step_12") is None


def test_latest_is_trusted_only_when_complete(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 8, complete=False)  # a crash mid-save
    point_latest(tmp_path, tag_for_step(4))
    assert latest_checkpoint(tmp_path) == "step_00000004"
    point_latest(tmp_path, tag_for_step(8))  # even if `latest` names a torn one
    assert latest_checkpoint(tmp_path) == "step_00000004"
    assert complete_checkpoints(tmp_path) == ["step_00000004"]


def test_newest_complete_is_used_when_latest_is_missing(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 8)  # crash after COMPLETE, before `latest` moved
    assert latest_checkpoint(tmp_path) == "step_00000008"


def test_prune_keeps_last_and_latest_and_drops_torn(tmp_path: Path) -> None:
    for s in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, s)
    fake_checkpoint(tmp_path, 10, complete=False)
    point_latest(tmp_path, tag_for_step(8))
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(removed) == ["step_00000002", "step_00000004", "step_00000010"]
    assert complete_checkpoints(tmp_path) == ["step_00000006", "step_00000008"]
    point_latest(tmp_path, tag_for_step(6))
    fake_checkpoint(tmp_path, 12)
    prune_checkpoints(tmp_path, keep_last=1)
    assert complete_checkpoints(tmp_path) == ["step_00000006", "step_00000012"]  # latest kept


def test_atomic_write_replaces_without_leftovers(tmp_path: Path) -> None:
    p = tmp_path / "latest"
    storage.atomic_write(p, b"a\n", durable=True)
    storage.atomic_write(p, b"b\n", durable=True)
    assert p.read_text() == "b\n"
    assert [x.name for x in tmp_path.iterdir()] == ["latest"]


# ------------------------------------------------------------ a real DeepSpeed engine


def tiny_engine(tmp_path: Path) -> tuple[Any, TrainConfig]:
    from kiln.models.build import build_model
    from kiln.training.engine import build_engine, init_distributed

    cfg = TrainConfig.model_validate(
        {
            "data": {"dataset": str(tmp_path / "unused"), "batch_size": 2},
            "model": ModelConfig(
                image_size=8,
                patch_size=4,
                vision_width=16,
                vision_layers=1,
                vision_heads=2,
                text_width=16,
                text_layers=1,
                text_heads=2,
                context_length=8,
                embed_dim=8,
            ).model_dump(),
            "zero": {"stage": 2},
        }
    )
    init_distributed()
    torch.manual_seed(0)
    return build_engine(build_model(cfg.model), cfg, 1), cfg


def train_step(engine: Any) -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 8, 8, generator=g)
    tokens = torch.randint(3, 200, (2, 8), generator=g)
    loss = clip_loss_of(engine(images, tokens))
    engine.backward(loss)
    engine.step()


@pytest.mark.slow
def test_real_save_commits_after_every_file_and_load_restores(
    tmp_path: Path, single_rank: None
) -> None:
    engine, cfg = tiny_engine(tmp_path)
    run = tmp_path / "run"
    train_step(engine)
    first = save_checkpoint(
        engine, run, step=1, client_state={"kiln": {"step": 1}}, model_config=cfg.model, keep_last=2
    )
    assert latest_checkpoint(run) == first == "step_00000001"
    files = {p.name for p in (checkpoints_dir(run) / first).iterdir()}
    assert {"model.pt", "rng_rank0.pt", COMPLETE_MARKER, "mp_rank_00_model_states.pt"} <= files
    # DeepSpeed's recovery scripts (zero_to_fp32.py needs huggingface_hub) are not shipped:
    # `kiln export` converts checkpoints
    assert {p.name for p in checkpoints_dir(run).iterdir()} == {first, "latest"}
    weights_1 = {k: v.clone() for k, v in engine.module.state_dict().items()}
    draws = (random.random(), np.random.rand(), torch.rand(1))  # what follows the save

    # save 2 crashes after all its files are written: nothing may point at it
    train_step(engine)
    seen: dict[str, Any] = {}

    def crash() -> None:
        seen["complete"] = (checkpoints_dir(run) / "step_00000002" / COMPLETE_MARKER).exists()
        seen["latest"] = (checkpoints_dir(run) / "latest").read_text().strip()
        seen["model"] = (checkpoints_dir(run) / "step_00000002" / "model.pt").exists()
        raise KeyboardInterrupt("simulated crash mid-save")

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(
            engine,
            run,
            step=2,
            client_state={"kiln": {"step": 2}},
            model_config=cfg.model,
            keep_last=2,
            before_commit=crash,
        )
    assert seen == {"complete": False, "latest": "step_00000001", "model": True}
    assert latest_checkpoint(run) == "step_00000001"

    # loading step 1 restores the weights and this rank's RNG states as saved
    fresh, _ = tiny_engine(tmp_path)
    client = load_checkpoint(fresh, run, "step_00000001")
    assert client["kiln"] == {"step": 1}
    for k, v in fresh.module.state_dict().items():
        assert torch.equal(v, weights_1[k]), k
    assert (random.random(), np.random.rand(), torch.rand(1)) == draws

    # a later save of the same step replaces the torn folder; pruning keeps keep_last
    for step in (2, 3, 4):
        train_step(fresh)
        save_checkpoint(
            fresh,
            run,
            step=step,
            client_state={"kiln": {"step": step}},
            model_config=cfg.model,
            keep_last=2,
        )
    assert complete_checkpoints(run) == ["step_00000003", "step_00000004"]
    assert latest_checkpoint(run) == "step_00000004"

    # resume verifies files against COMPLETE: a same-size change is caught by its sha256
    assert verify_checkpoint(run, "step_00000004") is None
    rng = checkpoints_dir(run) / "step_00000004" / "rng_rank0.pt"
    data = bytearray(rng.read_bytes())
    data[-1] ^= 0xFF
    rng.write_bytes(bytes(data))
    reason = verify_checkpoint(run, "step_00000004")
    assert reason == "rng_rank0.pt changed since it was written (sha256 differs)"
    assert resume_checkpoint(run) == ("step_00000003", [("step_00000004", reason)])


def test_checkpoints_hold_model_pt_only_for_models_up_to_the_limit() -> None:
    """`checkpoint.model_file: auto` gathers full weights at every save for small models
    only; a large one (or `never`) is exported on demand from DeepSpeed's files."""
    from kiln.training.config import TrainConfig
    from kiln.training.loop import wants_model_file

    def cfg(flavor: str, **checkpoint: object) -> TrainConfig:
        return TrainConfig.model_validate(
            {"data": {"dataset": "d"}, "model": {"flavor": flavor}, "checkpoint": checkpoint}
        )

    assert wants_model_file(cfg("clip-tiny"))
    assert wants_model_file(cfg("clip-vit-b-16"))  # 150M <= 200M
    assert not wants_model_file(cfg("clip-vit-l-14"))  # 428M
    assert wants_model_file(cfg("clip-vit-l-14", model_file="always"))
    assert not wants_model_file(cfg("clip-tiny", model_file="never"))
    assert not wants_model_file(cfg("clip-vit-b-16", model_file_max_params=100_000_000))


def test_resume_with_another_model_or_stage_names_the_difference(tmp_path: Path) -> None:
    from kiln.training.checkpoint import check_resumable
    from tests.helpers_training import TINY_MODEL

    model = ModelConfig.model_validate(TINY_MODEL)
    tag_dir = checkpoints_dir(tmp_path) / "step_00000002"
    tag_dir.mkdir(parents=True)
    marker = {"step": 2, "world_size": 2, "zero_stage": 2, "model_config": model.model_dump()}
    storage.atomic_write(tag_dir / COMPLETE_MARKER, json.dumps(marker).encode())

    assert check_resumable(tmp_path, "step_00000002", zero_stage=2, model=model)["step"] == 2
    # settings that do not change the weights may change on resume
    relaxed = model.model_copy(update={"activation_checkpointing": True})
    check_resumable(tmp_path, "step_00000002", zero_stage=2, model=relaxed)
    wider = ModelConfig.model_validate({**TINY_MODEL, "embed_dim": 32})
    with pytest.raises(ValueError, match=r"model\.embed_dim=16 \(this run: 32\)"):
        check_resumable(tmp_path, "step_00000002", zero_stage=2, model=wider)
    with pytest.raises(ValueError, match=r"zero\.stage=2 but this run uses zero\.stage=3"):
        check_resumable(tmp_path, "step_00000002", zero_stage=3, model=model)


def test_resume_names_the_settings_it_changes(capsys: pytest.CaptureFixture[str]) -> None:
    """A resume that changes allowed settings says which, old -> new (it printed two
    recipe hashes); a checkpoint that kept only the hash still gets a note; an unchanged
    recipe, none."""
    from kiln.training.checkpoint import changed_fields
    from kiln.training.loop import _note_recipe_changes
    from tests.helpers_training import TINY_MODEL

    base = {"data": {"dataset": "ds"}, "model": TINY_MODEL, "max_steps": 10}
    cfg = TrainConfig.model_validate(base)
    saved = cfg.model_dump(mode="json")
    changed = TrainConfig.model_validate(
        {**base, "max_steps": 20, "optim": {"lr": 5e-4}, "data": {"dataset": "ds", "batch_size": 8}}
    )
    assert [k for k, _, _ in changed_fields(saved, changed.model_dump(mode="json"))] == [
        "data.batch_size",
        "max_steps",
        "optim.lr",
    ]
    assert changed_fields({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == [("a.c", None, 2)]

    _note_recipe_changes(0, "step_00000004", {"train_config": saved}, changed, "h2")
    out = capsys.readouterr()
    assert (
        "note: resuming step_00000004 with changed settings: data.batch_size: 32 -> 8, "
        "max_steps: 10 -> 20, optim.lr: 0.001 -> 0.0005" in out.out + out.err
    )
    _note_recipe_changes(0, "step_00000004", {"train_config": saved}, cfg, "h2")
    _note_recipe_changes(1, "step_00000004", {"train_config": saved}, changed, "h2")  # rank 1
    out = capsys.readouterr()
    assert "note" not in out.out + out.err
    _note_recipe_changes(0, "step_00000004", {"recipe_hash": "h1"}, cfg, "h2")
    out = capsys.readouterr()
    assert "the recipe changed since step_00000004" in out.out + out.err
