"""The comparison table of a `kiln experiment`: its arms at equal compute, side by side.

Pure formatting of `comparison.json` (what `kiln.platform.experiment` writes), shared by the
experiment's own `comparison.md` and terminal table and by `kiln report`'s page, so the
report needs nothing of the experiment runner.
"""

from __future__ import annotations

from typing import Any

__all__ = ["COMPARISON_JSON", "COMPARISON_MD", "comparison_markdown", "comparison_rows"]

COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"

#: (column, path into an arm's eval.json) shown in the table.
_METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("color top1", ("zero_shot", "color", "top1")),
    ("shape top1", ("zero_shot", "shape", "top1")),
    ("i2t R@5", ("retrieval", "image_to_text", "recall@5")),
    ("t2i R@5", ("retrieval", "text_to_image", "recall@5")),
)


def _dig(doc: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def comparison_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the comparison table from a `comparison.json` document."""

    def pr(score: dict[str, Any] | None) -> str:
        return f"{_num(score['precision'])} / {_num(score['recall'])}" if score else "-"

    header = ["arm", "rows kept", "steps x samples", *(m for m, _ in _METRICS)]
    header += ["dup P / R", "mismatch P / R"]
    rows = []
    for arm in doc["arms"]:
        row = [arm["name"], str(arm["rows_kept"]), f"{arm['steps']} x {arm['samples_per_step']}"]
        row += [_num(_dig(arm["eval"], path)) for _, path in _METRICS]
        row += [pr(arm.get("duplicates")), pr(arm.get("mismatches"))]
        rows.append(row)
    return header, rows


def comparison_markdown(doc: dict[str, Any]) -> str:
    """`comparison.md`: the table as markdown, and what it was made with."""
    header, rows = comparison_rows(doc)
    lines = [f"# Experiment {doc['name']}", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    pool = doc["pool"]
    planted = doc.get("planted") or {}
    lines += [
        "",
        f"Pool: {pool['num_samples']} generated rows (seed {pool['seed']}), "
        f"{planted.get('near_duplicates', 0)} planted near-duplicates, "
        f"{planted.get('mismatched', 0)} planted mismatched captions; eval on "
        f"{doc['eval_samples']} held-out images. Every arm trains {doc['steps']} steps of "
        f"{doc['samples_per_step']} samples (batch {doc['batch_size']} on each of "
        f"{doc['workers']} ranks: equal compute). Metrics: zero-shot top1 (colour, "
        "shape) and retrieval recall@5 on the held-out set; P / R: precision / recall of "
        "the planted rows among those the arm's stages removed "
        f"(duplicates: {', '.join(doc['duplicate_reasons'])}; mismatches: "
        f"{', '.join(doc['mismatch_reasons'])}).",
    ]
    chance = _chance(doc["arms"][0]["eval"]) if doc["arms"] else ""
    if chance:
        lines.append(f"Chance: {chance}.")
    if doc.get("filter_eval"):
        f = doc["filter_eval"]
        lines.append(
            f"Filter model ({doc['filter_steps']} steps on a clean pool): "
            + ", ".join(f"{m} {_num(_dig(f, p))}" for m, p in _METRICS)
            + "."
        )
    lines.append(f"Wall time {doc['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def _chance(result: dict[str, Any]) -> str:
    """What a model guessing at random scores on each metric of the table."""
    parts = []
    for task, t in (result.get("zero_shot") or {}).items():
        if isinstance(t, dict) and "chance" in t:
            parts.append(f"{task} top1 {t['chance']:.3f}")
    n = (result.get("retrieval") or {}).get("num_samples")
    if n:
        parts.append(f"R@5 {min(1.0, 5 / n):.3f}")
    return ", ".join(parts)


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"
