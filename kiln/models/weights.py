"""A trained model's weights files: write, read and find them, with torch only (no DeepSpeed).

Two formats hold a full model:

- a kiln ``model.pt`` (``checkpoints/{tag}/model.pt``, written at every complete checkpoint
  of a model up to ``checkpoint.model_file_max_params``, or by ``kiln export --format pt``),
  a plain ``torch.save`` of::

      {"model_config": ModelConfig.model_dump(), "state_dict": {name: fp32 tensor}, "step": int}

- a ``.safetensors`` export (``kiln export``), with the model config and step in its
  metadata (`META_CONFIG`, `META_STEP`).

`locate_weights` finds the file of a train run dir, a checkpoint folder, a ``model.pt`` or
an export, from folder listings and markers only; `existing_weights` refuses, naming
``kiln export``, when the checkpoint has no ``model.pt`` and no export yet. Rebuilding the
weights from DeepSpeed's files (`kiln.training.export`) is training's job: this module is
what evaluation, `kiln.load_model` and curation's embed stage share (DESIGN.md's layering:
curation reads models, never training).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln import storage
from kiln.contracts import require_file
from kiln.models.build import build_model
from kiln.models.checkpoint_index import (
    checkpoints_dir,
    complete_checkpoints,
    is_complete,
    latest_checkpoint,
    step_of_tag,
    tag_for_step,
)
from kiln.models.config import ModelConfig

__all__ = [
    "EXPORTS_DIR",
    "META_CONFIG",
    "META_STEP",
    "MODEL_FILE",
    "checkpoint_folder",
    "existing_weights",
    "load_model_file",
    "load_weights",
    "locate_weights",
    "read_model_file",
    "save_model_file",
]

MODEL_FILE = "model.pt"
EXPORTS_DIR = "exports"
#: safetensors metadata keys of an export: the model config (JSON) and the step.
META_CONFIG = "kiln_model_config"
META_STEP = "kiln_step"


def save_model_file(
    path: str, model: nn.Module | Mapping[str, torch.Tensor], cfg: ModelConfig, step: int
) -> str:
    """Write the weights file atomically (temp file, then rename); returns `path`.

    `model` is the plain model or an already consolidated state dict (with ZeRO-3, gather
    the parameters first, e.g. ``engine._zero3_consolidated_16bit_state_dict()``, or pass
    the module inside ``deepspeed.zero.GatheredParameters``). Tensors are stored as fp32
    CPU copies. A crash mid-write leaves at most a stray ``.tmp`` file, never a torn file.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    payload = {
        "model_config": cfg.model_dump(mode="json"),
        "state_dict": {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()},
        "step": int(step),
    }
    with storage.atomic_open(path, durable=True) as f:
        torch.save(payload, f)
    return path


def read_model_file(path: str) -> tuple[dict[str, torch.Tensor], ModelConfig, int]:
    """``(state dict, model config, step)`` of a kiln ``model.pt``."""
    fs, fspath = require_file(
        path,
        f"no model weights file at {path!r}: pass a run dir, a checkpoints/<tag>/model.pt "
        "or a file written by `kiln export`",
    )
    try:
        with fs.open(fspath, "rb") as f:
            payload = torch.load(f, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise ValueError(
            f"{path!r} cannot be read as a model file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}): it is truncated or damaged; "
            "evaluate another checkpoint (kiln eval RUN_DIR picks the latest complete one) "
            "or re-export it with `kiln export`"
        ) from e
    missing = {"model_config", "state_dict", "step"} - set(payload)
    if missing:
        raise ValueError(
            f"{path!r} is not a kiln model file: missing keys {sorted(missing)} "
            "(expected model_config, state_dict, step; see save_model_file)"
        )
    cfg = ModelConfig.model_validate(payload["model_config"])
    return payload["state_dict"], cfg, int(payload["step"])


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, int]:
    """(state dict, model config, step) of a ``.safetensors`` export or a ``model.pt``."""
    p = Path(path)
    if p.suffix != ".safetensors":
        return read_model_file(str(p))
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            meta: dict[str, Any] = f.metadata() or {}
            if META_CONFIG not in meta:
                raise ValueError(
                    f"{p} has no kiln model config in its metadata: export it with `kiln export`"
                )
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except SafetensorError as e:
        raise ValueError(
            f"{str(p)!r} cannot be read as a model file (SafetensorError: {e}): it is "
            "truncated or damaged; re-export it with `kiln export`"
        ) from e
    cfg = ModelConfig.model_validate(json.loads(meta[META_CONFIG]))
    return state, cfg, int(meta.get(META_STEP, 0))


def load_model_file(path: str) -> tuple[nn.Module, ModelConfig, int]:
    """``(model in eval mode on CPU, its config, the step it was saved at)`` of a
    ``model.pt`` or a ``.safetensors`` export."""
    state, cfg, step = load_weights(path)
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, cfg, step


def checkpoint_folder(run_dir: Path, step: int | None) -> Path:
    """The complete checkpoint of `step` (default: the latest) of run `run_dir`."""
    if step is None:
        tag = latest_checkpoint(run_dir)
        if tag is None:
            raise FileNotFoundError(
                f"{run_dir} has no complete checkpoint (no checkpoints/latest naming a "
                "COMPLETE tag): train it first"
            )
    else:
        tag = tag_for_step(step)
        if not is_complete(run_dir, tag):
            steps = [step_of_tag(t) for t in complete_checkpoints(run_dir)]
            raise FileNotFoundError(
                f"{run_dir} has no complete checkpoint at step {step}: it has steps {steps}"
            )
    return checkpoints_dir(run_dir) / tag


def locate_weights(source: str | Path, *, step: int | None = None) -> tuple[Path, bool]:
    """(weights file for `source`, whether it must first be exported): the file itself, the
    checkpoint's ``model.pt``, or -- when the checkpoint has none (a large model) -- its
    export under ``{run}/exports/{tag}.safetensors``. Reads nothing but folder listings
    and markers, so `--dry-run` can ask."""
    p = Path(source)
    if p.is_file():
        return p, False
    if not p.exists():
        raise FileNotFoundError(
            f"{source!r} does not exist: give a train run dir, a checkpoint folder, a "
            f"{MODEL_FILE} or an exported .safetensors file"
        )
    if step_of_tag(p.name) is not None and p.parent.name == "checkpoints":
        run, step = p.parent.parent, step_of_tag(p.name)
    elif (p / "latest").is_file() and p.name == "checkpoints":
        run = p.parent
    else:
        run = p
    tag_dir = checkpoint_folder(run, step)
    if (tag_dir / MODEL_FILE).is_file():
        return tag_dir / MODEL_FILE, False
    out = run / EXPORTS_DIR / f"{tag_dir.name}.safetensors"
    return out, not out.is_file()


def existing_weights(source: str | Path, *, step: int | None = None) -> Path:
    """The weights file of `source` (see `locate_weights`) when it already exists; a
    checkpoint without ``model.pt`` (a large model) and without an export is refused with
    the ``kiln export`` command that writes one (rebuilding the weights from DeepSpeed's
    files is training's job, `kiln.training.export`)."""
    path, needs_export = locate_weights(source, step=step)
    if needs_export:
        run = path.parent.parent
        at = step_of_tag(path.name.removesuffix(".safetensors"))
        raise FileNotFoundError(
            f"checkpoint step {at} of {str(run)!r} has no {MODEL_FILE} (a large model's "
            f"checkpoints hold only DeepSpeed's shards) and no export at {str(path)!r}: run "
            f"`kiln export {run} --step {at}` first (it writes that file), or give a "
            f"{MODEL_FILE} or .safetensors file"
        )
    return path
