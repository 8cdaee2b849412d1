"""How well pruning found what was planted: precision and recall against a ground truth.

The synthetic pool's `planted.json` (`kiln.data_curation.synthetic.read_planted`) lists
groups of near-duplicates (a source uid and its copies) and the uids of mismatched rows. A
curation run's `rejects/{step}/` parquet files hold every dropped row's uid and reason.

- Near-duplicates: a group of g rows has g - 1 redundant ones; removing any g - 1 of them
  (the source or a copy) is right, so a group scores `min(removed in the group, g - 1)`
  hits. Precision = hits / rows the duplicate reasons removed; recall = hits / redundant
  rows planted.
- Mismatches: precision = mismatched rows among those the mismatch reasons removed;
  recall = share of the mismatched rows that were removed by them.

A precision with nothing removed, or a recall with nothing planted, is None (not 0 or 1:
there is nothing to score).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow.parquet as pq

from kiln import storage

__all__ = ["PlantedScore", "removed_uids", "score_duplicates", "score_mismatches"]

PlantedScore = dict[str, Any]


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def score_duplicates(groups: list[list[str]], removed: set[str]) -> PlantedScore:
    """Precision / recall of `removed` (uids dropped as duplicates) against planted groups."""
    planted = sum(len(g) - 1 for g in groups)
    hits = sum(min(len(removed.intersection(g)), len(g) - 1) for g in groups)
    return {
        "planted": planted,
        "removed": len(removed),
        "hits": hits,
        "precision": _ratio(hits, len(removed)),
        "recall": _ratio(hits, planted),
    }


def score_mismatches(mismatched: Iterable[str], removed: set[str]) -> PlantedScore:
    """Precision / recall of `removed` (uids dropped as mismatches) against planted ones."""
    truth = set(mismatched)
    hits = len(truth & removed)
    return {
        "planted": len(truth),
        "removed": len(removed),
        "hits": hits,
        "precision": _ratio(hits, len(removed)),
        "recall": _ratio(hits, len(truth)),
    }


def removed_uids(curate_run_dir: str, reasons: Iterable[str]) -> set[str]:
    """uids a curation run dropped with one of `reasons` (from its `rejects/*/` files)."""
    wanted = set(reasons)
    found: set[str] = set()
    root = f"{curate_run_dir.rstrip('/')}/rejects"
    if not storage.exists(root):
        raise FileNotFoundError(
            f"{root} does not exist: score a finished curation run that kept its rejects "
            "(write_rejects: true, the default)"
        )
    fs, path = storage.fs_path(root)
    for name in sorted(fs.find(path)):
        if not name.endswith(".parquet"):
            continue
        with fs.open(name, "rb") as f:
            table = pq.read_table(f, columns=["uid", "drop_reason"])
        for uid, reason in zip(
            table.column("uid").to_pylist(), table.column("drop_reason").to_pylist(), strict=True
        ):
            if reason in wanted:
                found.add(uid)
    return found
