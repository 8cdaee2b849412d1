"""Terminal summaries of job results: curation funnel, training run, evaluation."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from kiln.platform.tables import format_kv, format_table

__all__ = [
    "balance_effect_of",
    "curation_step_records",
    "eval_record",
    "eval_rows",
    "format_curation",
    "format_eval",
    "format_result",
    "format_train",
    "funnel_rows",
    "language_rows",
]


def _as_dict(result: Any) -> dict[str, Any]:
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json")
    return dict(result) if isinstance(result, dict) else {"result": result}


def balance_effect_of(curation: dict[str, Any]) -> dict[str, Any] | None:
    """The `entry_counts` report of the run's balancing step (whatever its step name)."""
    for step in (curation.get("steps") or {}).values():
        effect = (step.get("extra") or {}).get("entry_counts")
        if effect:
            return dict(effect)
    return None


def language_rows(curation: dict[str, Any]) -> list[tuple[str, int, int | None, int]]:
    """(language, matched, t, kept) per language of a worldwide (MetaCLIP 2) curation, by
    matched count descending; empty for other plans."""
    matched: dict[str, int] = {}
    balance: dict[str, Any] = {}
    for step in (curation.get("steps") or {}).values():
        extra = step.get("extra") or {}
        matched = extra.get("matched_by_language", matched)
        balance = extra if "t_by_language" in extra else balance
    t, kept = balance.get("t_by_language") or {}, balance.get("kept_by_language") or {}
    rows = [(code, int(n), t.get(code), int(kept.get(code, 0))) for code, n in matched.items()]
    return sorted(rows, key=lambda row: (-row[1], row[0]))


def curation_step_records(curation: dict[str, Any]) -> list[dict[str, Any]]:
    """One `metrics.jsonl` record per step of a curation result, in plan order (`step` 1
    is the read): rows in and out, rows dropped (in all and by reason), seconds, rows/s."""
    records = []
    for i, (name, s) in enumerate((curation.get("steps") or {}).items(), start=1):
        seconds = float(s.get("seconds") or 0.0)
        dropped = {str(k): int(v) for k, v in (s.get("dropped") or {}).items()}
        records.append(
            {
                "step": i,
                "name": name,
                "rows_in": s.get("rows_in"),
                "rows_out": s.get("rows_out"),
                "dropped": sum(dropped.values()),
                "seconds": seconds,
                "rows_per_s": (s.get("rows_in") or 0) / seconds if seconds > 0 else None,
                "reused": bool(s.get("reused")),
                "dropped_by_reason": dropped,
            }
        )
    return records


#: leaves of an evaluation report that describe the eval set, not the model
_EVAL_NOT_SCALARS = frozenset({"step", "num_samples", "num_classes", "chance"})


def eval_record(result: dict[str, Any]) -> dict[str, Any]:
    """An evaluation report as one `metrics.jsonl` record: `step` (the checkpoint's) and
    every numeric leaf but the eval set's sizes and chance levels, as `eval/a/b/c` (e.g.
    `eval/zero_shot/color/top1`, `eval/retrieval/image_to_text/recall@5`)."""
    record: dict[str, Any] = {"step": int(result.get("step") or 0)}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k not in _EVAL_NOT_SCALARS:
                    walk(v, f"{path}/{k}")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            record[path] = float(node)

    for section in ("zero_shot", "retrieval", "probe"):
        walk(result.get(section), f"eval/{section}")
    return record


def funnel_rows(r: dict[str, Any]) -> list[tuple[str, object]]:
    """Rows that add up: samples in, then each step's drops in plan order, one row per
    reason (`- {step}: {reason}`), then samples out."""
    rows: list[tuple[str, object]] = [("samples in", r.get("samples_in"))]
    for name, step in (r.get("steps") or {}).items():
        for reason, n in sorted((step.get("dropped") or {}).items()):
            if n:
                rows.append((f"- {name}: {reason}", -int(n)))
    rows.append(("samples out", r.get("samples_out")))
    return rows


def format_curation(r: dict[str, Any]) -> str:
    """The curation funnel: rows in, each step's drops by reason in order, out."""
    pairs: list[tuple[str, object]] = [
        *funnel_rows(r),
        ("shards", r.get("num_shards")),
        ("dataset", r.get("dataset_dir")),
        ("seconds", _num(r.get("seconds"))),
    ]
    pairs = [(k, v) for k, v in pairs if v is not None or k in ("samples in", "samples out")]
    out = format_kv(pairs, "curation")
    steps = r.get("steps") or {}
    if steps:
        step_rows = [
            (
                name,
                s.get("rows_in"),
                s.get("rows_out"),
                "reused" if s.get("reused") else _num(s.get("seconds")),
            )
            for name, s in steps.items()
        ]
        out += "\n\n" + format_table(("step", "rows in", "rows out", "seconds"), step_rows)
    effect = balance_effect_of(r)
    if effect and effect.get("top"):
        before, after = effect["max_over_median"]
        out += "\n\n" + format_table(
            ("entry", "count before balancing", "after"), [tuple(row) for row in effect["top"]]
        )
        out += f"\nlargest entry count / median: {before} before, {after} after balancing"
    languages = language_rows(r)
    if languages:
        out += "\n\n" + format_table(("language", "matched", "t", "kept"), languages)
    return out


def format_train(r: dict[str, Any]) -> str:
    """Steps, losses, throughput and the checkpoint of a training invocation."""
    values = list(r.get("losses") or [])
    pairs: list[tuple[str, object]] = [
        ("steps (this invocation)", f"{r.get('first_step')} -> {r.get('last_step')}"),
        ("first loss", _num(values[0]) if values else None),
        ("last loss", _num(values[-1]) if values else None),
        ("samples/s", _num(r.get("samples_per_s"))),
        ("latest checkpoint", r.get("latest_checkpoint")),
    ]
    if r.get("restarts"):
        pairs.append(("restarts", r["restarts"]))
    out = format_kv(pairs, "training")
    if r.get("eval"):  # the end-of-training evaluation, against chance
        out += "\n\n" + format_eval(r["eval"])
    return out


def eval_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, value, baseline) rows: zero-shot accuracy, probe accuracy (image-only
    models), caption samples (CoCa) and retrieval recall."""
    rows: list[tuple[str, str, str]] = []
    for task, t in (r.get("zero_shot") or {}).items():
        if not isinstance(t, dict):
            continue
        for k in ("top1", "top5"):
            if k in t:
                chance = min(1.0, t["chance"] * (5 if k == "top5" else 1))
                rows.append((f"zero-shot {task} {k}", f"{t[k]:.3f}", f"chance {_rate(chance)}"))
    for task, t in (r.get("probe") or {}).items():
        for k, label in (("knn_top1", "kNN top1"), ("linear_probe_top1", "linear probe top1")):
            if isinstance(t, dict) and k in t:
                rows.append((f"{task} {label}", f"{t[k]:.3f}", f"chance {_rate(t['chance'])}"))
    for c in r.get("captions") or []:
        rows.append((f"caption {c['uid'][:8]}", repr(c["greedy"]), f"ref {c['reference']!r}"))
    ret = r.get("retrieval") or {}
    n = ret.get("num_samples")
    for direction in ("image_to_text", "text_to_image"):
        recalls = ret.get(direction) or {}
        for key in sorted(recalls, key=lambda name: int(name.split("@")[-1])):
            at = int(key.split("@")[-1])
            base = f"chance {_rate(min(1.0, at / n))}" if n else ""
            rows.append((f"{direction.replace('_', ' ')} {key}", f"{recalls[key]:.3f}", base))
    return rows


def format_eval(r: dict[str, Any]) -> str:
    """Zero-shot accuracy against chance, retrieval recall@k."""
    rows = eval_rows(r)
    return format_table(("eval", "value", "baseline"), rows) if rows else "eval: nothing evaluated"


def format_result(result: Any) -> str:
    """Pick the summary that fits what a job returned."""
    if isinstance(result, str):
        return result
    r = _as_dict(result)
    if "samples_out" in r:
        return format_curation(r)
    if "last_step" in r:
        return format_train(r)
    if "zero_shot" in r or "retrieval" in r or "probe" in r:
        return format_eval(r)
    return "\n".join(f"{k}: {v}" for k, v in r.items())


def _rate(x: float) -> str:
    """A rate in [0, 1] with three decimals, or two significant digits when smaller than
    0.01, so a small chance level never prints as 0.000."""
    return f"{x:.3f}" if x >= 0.01 or x == 0 else f"{x:.2g}"


def _num(x: Any) -> str | None:
    if x is None:
        return None
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e5 else f"{x:,.0f}"
    return str(x)
