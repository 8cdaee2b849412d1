"""Full model weights out of a training checkpoint, on demand.

A checkpoint always holds DeepSpeed's files (each rank's partition of the weights and of
the fp32 optimizer state); the consolidated ``model.pt`` beside them is written at every
save only for models up to `checkpoint.model_file_max_params` (``model_file: auto``),
because gathering a billion-parameter model on rank 0 at every save costs a spike of
memory and minutes of I/O. `consolidate` rebuilds the full fp32 weights from DeepSpeed's
files offline, on CPU, without a process group (DeepSpeed's own ``zero_to_fp32`` logic for
ZeRO 1-3; the module states for ZeRO-0), and `export_model` writes them as safetensors
(with the model config and step in its metadata) or as a kiln ``model.pt``.
`resolve_weights` finds the weights file of a run directory, a checkpoint folder, a
``model.pt`` or an exported ``.safetensors`` and exports it first when it is missing
(`kiln.inference.load_model` builds on it). Reading and finding weights files without
DeepSpeed is `kiln.models.weights` (re-exported here: `load_weights`, `locate_weights`).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Literal

import torch

from kiln import storage
from kiln.models.checkpoint_index import read_complete_marker, step_of_tag
from kiln.models.config import ModelConfig
from kiln.models.weights import (
    EXPORTS_DIR,
    META_CONFIG,
    META_STEP,
    MODEL_FILE,
    checkpoint_folder,
    load_weights,
    locate_weights,
    save_model_file,
)

__all__ = [
    "EXPORTS_DIR",
    "MODEL_FILE",
    "consolidate",
    "export_model",
    "load_weights",
    "locate_weights",
    "resolve_weights",
]


def consolidate(
    run_dir: str | Path, step: int | None = None
) -> tuple[dict[str, torch.Tensor], ModelConfig, int]:
    """(full fp32 state dict, model config, step) of a run's checkpoint (default: latest),
    rebuilt from DeepSpeed's files whether or not the checkpoint has a ``model.pt``."""
    run = Path(run_dir)
    tag_dir = checkpoint_folder(run, step)
    marker = read_complete_marker(run, tag_dir.name)
    if "model_config" not in marker:
        raise ValueError(
            f"checkpoint {tag_dir} was written by a kiln without model configs in its "
            f"COMPLETE marker: use its {MODEL_FILE} instead"
        )
    cfg = ModelConfig.model_validate(marker["model_config"])
    if marker.get("zero_stage", 0) == 0:
        state = _zero0_weights(tag_dir)
    else:
        from kiln.training.engine import import_deepspeed

        import_deepspeed()  # with the environment it reads (DS_ACCELERATOR: no CPU warning)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        quiet = io.StringIO()  # it prints its progress and a tqdm bar
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag_dir.name)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    return state, cfg, int(marker["step"])


def _zero0_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """ZeRO-0 saves the whole module (in the training dtype) in its model-states file."""
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir} has no DeepSpeed model states file")
    states = torch.load(files[0], map_location="cpu", weights_only=False)
    module: dict[str, torch.Tensor] = states["module"]
    return module


def export_model(
    run_dir: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    fmt: Literal["safetensors", "pt"] = "safetensors",
) -> Path:
    """Write the full weights of a run's checkpoint to `out`; returns its path."""
    state, cfg, at = consolidate(run_dir, step)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pt":
        save_model_file(str(path), state, cfg, at)
        return path
    from safetensors.torch import save_file

    meta = {META_CONFIG: json.dumps(cfg.model_dump(mode="json")), META_STEP: str(at)}
    with storage.atomic_path(path, durable=True) as tmp:
        save_file(state, tmp, metadata=meta)
    return path


def resolve_weights(source: str | Path, *, step: int | None = None) -> Path:
    """A weights file for `source` (see `locate_weights`), exported once on first use when
    the checkpoint has no ``model.pt``."""
    path, needs_export = locate_weights(source, step=step)
    if needs_export:
        tag_dir = path.name.removesuffix(".safetensors")
        export_model(path.parent.parent, path, step=step_of_tag(tag_dir))
    return path
