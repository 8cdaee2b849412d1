"""Where a run's checkpoints are and which are complete: names and markers only.

Torch-free, so listing runs (`kiln runs`) or choosing a checkpoint to evaluate does not pay
for importing torch. It lives with the models because finding a run's weights
(`kiln.models.weights`) needs it, and curation's embed stage must not import training.
Writing and loading checkpoints is `kiln.training.checkpoint`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINTS_DIR",
    "COMPLETE_MARKER",
    "LATEST_FILE",
    "checkpoints_dir",
    "complete_checkpoints",
    "is_complete",
    "latest_checkpoint",
    "read_complete_marker",
    "step_of_tag",
    "tag_for_step",
]

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
_TAG_RE = re.compile(r"^step_(\d{8,})$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    """``{run_dir}/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS_DIR


def tag_for_step(step: int) -> str:
    """Checkpoint tag of optimizer step `step`: ``step_00000012``."""
    return f"step_{step:08d}"


def step_of_tag(tag: str) -> int | None:
    """Inverse of `tag_for_step`; None for names that are not checkpoint tags."""
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def is_complete(run_dir: str | Path, tag: str) -> bool:
    """True if `tag`'s folder has its COMPLETE marker (every rank finished writing it)."""
    return (checkpoints_dir(run_dir) / tag / COMPLETE_MARKER).is_file()


def read_complete_marker(run_dir: str | Path, tag: str) -> dict[str, Any]:
    """The COMPLETE marker of `tag` (step, world size, ZeRO stage, files)."""
    path = checkpoints_dir(run_dir) / tag / COMPLETE_MARKER
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint marker {path} is unreadable ({e}): use another tag") from e
    return data


def complete_checkpoints(run_dir: str | Path) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and step_of_tag(p.name) is not None]
    return sorted((t for t in tags if is_complete(run_dir, t)), key=lambda t: step_of_tag(t) or 0)


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The tag to resume from: the one `latest` names if it is complete, else the newest
    complete tag (a crash between COMPLETE and moving `latest`), else None."""
    latest = checkpoints_dir(run_dir) / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag and is_complete(run_dir, tag):
            return tag
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None
