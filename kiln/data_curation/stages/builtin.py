"""The built-in stages: importing this module registers each of them (one line per stage)."""

from __future__ import annotations

from kiln.data_curation.stages import (
    dedup,
    image,
    language,
    metaclip_balance,
    metaclip_match,
    text,
)

__all__ = ["dedup", "image", "language", "metaclip_balance", "metaclip_match", "text"]
