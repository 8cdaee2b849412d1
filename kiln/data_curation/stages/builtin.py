"""The built-in stages: importing this module registers each of them (one line per stage)."""

from __future__ import annotations

from kiln.data_curation.stages import (
    caption_pick,
    clip_score,
    dedup,
    density_prune,
    download,
    embed,
    image,
    language,
    metaclip_balance,
    metaclip_match,
    semdedup,
    text,
    uid_index,
    worldwide_balance,
    worldwide_match,
)

__all__ = [
    "caption_pick",
    "clip_score",
    "dedup",
    "density_prune",
    "download",
    "embed",
    "image",
    "language",
    "metaclip_balance",
    "metaclip_match",
    "semdedup",
    "text",
    "uid_index",
    "worldwide_balance",
    "worldwide_match",
]
