"""Full weights out of sharded checkpoints: `kiln export`, `kiln.load_model`, and
checkpoints without a consolidated model.pt (2 gloo ranks, real DeepSpeed, CPU fp32).

The weights DeepSpeed's files give back offline (ZeRO-2: the fp32 optimizer partitions;
ZeRO-3: the partitioned parameters) must equal, tensor for tensor, the model.pt gathered
from the live engine at the same save.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kiln
from kiln.data_curation.stages.embed import EmbedConfig, EmbedStage, file_sha256
from kiln.inference import load_model
from kiln.training import train
from kiln.training.checkpoint import checkpoints_dir, read_complete_marker
from kiln.training.config import TrainConfig
from kiln.training.evaluate import read_model_file
from kiln.training.export import consolidate, export_model, load_weights
from tests.helpers_datasets import write_tiny_dataset
from tests.helpers_training import TINY_MODEL

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_dataset(tmp_path_factory.mktemp("export") / "ds", num_samples=32))


def _train(dataset: str, run: Path, stage: int, model_file: str) -> Path:
    cfg = TrainConfig.model_validate(
        {
            "data": {"dataset": dataset, "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8},
            "model": TINY_MODEL,
            "optim": {"lr": 2e-3, "warmup_steps": 1},
            "zero": {"stage": stage, "param_persistence_threshold": 0},
            "checkpoint": {"every_steps": 2, "keep_last": 2, "model_file": model_file},
            "max_steps": STEPS,
            "seed": 3,
        }
    )
    train(cfg, str(run), num_workers=2, launcher="local")
    return run


@pytest.fixture(scope="module")
def runs(dataset: str, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Trained on first use, once per ZeRO stage: `model_file: always`."""

    class Runs(dict[int, Path]):
        def __missing__(self, stage: int) -> Path:
            root = tmp_path_factory.mktemp(f"zero{stage}")
            self[stage] = _train(dataset, root / "run", stage, "always")
            return self[stage]

    return Runs()


@pytest.fixture(params=[2, 3], ids=["zero2", "zero3"])
def run(request: pytest.FixtureRequest, runs: dict[int, Path]) -> Path:
    return runs[request.param]


def _images_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size = TINY_MODEL["vision"]["image_size"]
    images = torch.rand(3, 3, size, size, generator=g)
    tokens = torch.randint(3, 200, (3, TINY_MODEL["text"]["context_length"]), generator=g)
    return images, tokens


def test_deepspeed_files_give_back_the_gathered_weights(run: Path) -> None:
    for step in (2, STEPS):
        state, cfg, at = consolidate(run, step)
        gathered, gathered_cfg, gathered_step = read_model_file(
            str(checkpoints_dir(run) / f"step_{step:08d}" / "model.pt")
        )
        assert at == gathered_step == step and cfg == gathered_cfg
        assert state.keys() == gathered.keys()
        for k, v in gathered.items():
            assert torch.equal(state[k], v), k


def test_export_and_load_model(run: Path, tmp_path: Path) -> None:
    out = export_model(run, tmp_path / "w.safetensors")
    _, cfg, step = load_weights(out)
    assert step == STEPS and cfg.flavor == "clip-tiny"
    from_file = kiln.load_model(out)
    from_pt = load_model(checkpoints_dir(run) / f"step_{STEPS:08d}" / "model.pt")
    from_run = load_model(run)
    images, tokens = _images_tokens()
    with torch.no_grad():
        ref_i, ref_t = from_pt.encode_image(images), from_pt.encode_text(tokens)
        for m in (from_file, from_run):
            assert torch.equal(m.encode_image(images), ref_i)
            assert torch.equal(m.encode_text(tokens), ref_t)
    assert from_run.cfg == cfg and from_run.step == STEPS and not from_run.module.training


def test_a_checkpoint_without_model_file_is_exported_on_demand(
    dataset: str, tmp_path: Path, runs: dict[int, Path]
) -> None:
    """`model_file: never` (what `auto` does for a large model), ZeRO-3: no model.pt in
    any save, the COMPLETE marker carries the model config, and `kiln.load_model` and
    `kiln export` rebuild the weights from DeepSpeed's files."""
    run = runs[3]
    lean = _train(dataset, tmp_path / "lean", 3, "never")
    assert not list(checkpoints_dir(lean).rglob("model.pt"))
    marker = read_complete_marker(lean, f"step_{STEPS:08d}")
    assert marker["model_config"]["flavor"] == "clip-tiny"
    with pytest.raises(ValueError, match=re.escape(f"`kiln export {lean} --step {STEPS}` first")):
        EmbedStage().check(EmbedConfig(model=str(lean)))  # curation cannot export
    model = load_model(lean)  # writes exports/step_00000004.safetensors once
    export = lean / "exports" / f"step_{STEPS:08d}.safetensors"
    assert export.is_file()
    checked = EmbedStage().check(EmbedConfig(model=str(lean)))  # now it reads the export
    assert checked["model_sha256"] == file_sha256(str(export))
    ref = load_model(run)  # the same training with model.pt: bitwise the same weights
    images, tokens = _images_tokens()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), ref.encode_image(images))
        assert torch.equal(model.encode_text(tokens), ref.encode_text(tokens))

    cmd = [sys.executable, "-m", "kiln.platform.cli", "export", str(lean), "--step", "2"]
    # a user's shell has no DS_ACCELERATOR: DeepSpeed then warned it had fallen back to CPU
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "exported clip-tiny at step 2" in done.stdout
    assert "WARNING" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert (lean / "exports" / "step_00000002.safetensors").is_file()

    bad = subprocess.run([*cmd[:-1], "7"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "no complete checkpoint at step 7: it has steps [2, 4]" in bad.stderr
    assert "Traceback" not in bad.stderr and "Loading checkpoint shards" not in done.stderr
