"""`zero.align_params`: DeepSpeed's ZeRO 1-2 flat buffers with every parameter on a 16-byte
boundary (real DeepSpeed, gloo, CPU fp32, where `always` turns it on; `auto` turns it on for
bf16 parameters, on GPUs).

What must hold: the padding moves no number (an aligned run trains the unaligned
reference's losses bitwise, and its consolidated weights are the ones `model.pt` holds);
a resume at the same world size rebuilds the layout its checkpoint was written with, and
says so when the recipe would choose the other. Elastic resume of an aligned checkpoint
(the universal form) is in test_elastic_resume.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.training import train
from kiln.training.checkpoint import checkpoints_dir, read_complete_marker, tag_for_step
from kiln.training.config import TrainConfig
from kiln.training.evaluate import load_model_file
from kiln.training.export import consolidate
from tests.helpers_training import (
    SHORT_RUN_STEPS,
    last_loss_per_step,
    rewind_run,
    short_run_config,
)

pytestmark = pytest.mark.slow


def _config(dataset: str, align: str) -> TrainConfig:
    cfg = short_run_config(dataset)
    return cfg.model_copy(update={"zero": cfg.zero.model_copy(update={"align_params": align})})


def _misaligned(engine: Any) -> list[str]:
    return [n for n, p in engine.module.named_parameters() if p.data_ptr() % 16]


def test_aligned_engine_starts_every_parameter_on_16_bytes(single_rank: None) -> None:
    from kiln.models.build import build_model
    from kiln.training.engine import build_engine, init_distributed

    init_distributed()
    engines = {}
    for align in ("never", "always"):
        cfg = _config("unused", align)
        torch.manual_seed(0)
        engines[align] = build_engine(build_model(cfg.model), cfg, 1)
    # the 1-element logit_scale is first among the undecayed parameters: unaligned, every
    # bias and norm weight after it sits 4 bytes off
    assert "visual.ln_post.weight" in _misaligned(engines["never"])
    assert _misaligned(engines["always"]) == []
    assert engines["always"].zero_parameter_alignment() is True


def test_aligned_run_trains_the_reference_and_resumes_exactly(
    short_dataset: str, short_reference: list[float], tmp_path: Path
) -> None:
    run = tmp_path / "aligned"
    cfg = _config(short_dataset, "always")
    train(cfg, str(run), num_workers=2, launcher="local")
    assert last_loss_per_step(run) == dict(enumerate(short_reference, start=1))
    tag = tag_for_step(SHORT_RUN_STEPS)
    assert read_complete_marker(run, tag)["param_alignment"] is True

    # DeepSpeed's files consolidate (zero_to_fp32, through the padding) to model.pt's weights
    saved, _, _ = load_model_file(str(checkpoints_dir(run) / tag / "model.pt"))
    weights, _, step = consolidate(run, SHORT_RUN_STEPS)
    assert step == SHORT_RUN_STEPS
    assert weights.keys() == saved.state_dict().keys()
    for name, tensor in saved.state_dict().items():
        assert torch.equal(weights[name], tensor), name

    # a same-size resume rebuilds the aligned layout and retrains steps 5-6 bitwise
    rewound = rewind_run(run, tmp_path / "rewound", 4)
    resumed = train(cfg, str(rewound), num_workers=2, launcher="local", resume=True)
    assert (resumed.resumed_from, resumed.last_step) == (4, SHORT_RUN_STEPS)
    assert last_loss_per_step(rewound) == dict(enumerate(short_reference, start=1))


def test_resume_keeps_the_layout_its_checkpoint_was_written_with(
    short_dataset: str,
    short_reference_run: Path,
    short_reference: list[float],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # the reference was written unaligned; the recipe now asks for alignment
    rewound = rewind_run(short_reference_run, tmp_path / "rewound", 4)
    cfg = _config(short_dataset, "always")
    resumed = train(cfg, str(rewound), num_workers=2, launcher="local", resume=True)
    assert (resumed.resumed_from, resumed.last_step) == (4, SHORT_RUN_STEPS)
    assert last_loss_per_step(rewound) == dict(enumerate(short_reference, start=1))
    assert read_complete_marker(rewound, tag_for_step(SHORT_RUN_STEPS))["param_alignment"] is False
    out = capfd.readouterr().out
    assert (
        "resume: step_00000004 was written with ZeRO parameters unaligned and its optimizer "
        "states are in that layout, so this run keeps it (zero.align_params=always would "
        "choose the other; a resume on another number of ranks takes that one)"
    ) in " ".join(out.split())
