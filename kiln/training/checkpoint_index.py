"""Where a run's checkpoints are and which are complete: re-exported from
`kiln.models.checkpoint_index`, which owns them so curation's embed stage can find a run's
weights without importing training (the layering of DESIGN.md)."""

from __future__ import annotations

from kiln.models.checkpoint_index import (
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    LATEST_FILE,
    checkpoints_dir,
    complete_checkpoints,
    is_complete,
    latest_checkpoint,
    read_complete_marker,
    step_of_tag,
    tag_for_step,
)

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
