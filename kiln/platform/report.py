"""A self-contained HTML report of a run: summary, curation funnel, loss curves, eval.

No plotting library: loss curves are drawn as inline SVG so the file opens anywhere,
offline, and diffs cleanly.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kiln.platform.summary import balance_effect_of

__all__ = ["svg_lines", "write_report"]

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def svg_lines(
    series: Mapping[str, Mapping[int, float]], width: int = 640, height: int = 280
) -> str:
    """Step -> value series as an SVG line chart (later series dashed, so overlaps show)."""
    points = [(x, y) for s in series.values() for x, y in s.items()]
    if not points:
        return "<p>no data</p>"
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    pad = 40
    sx = (width - 2 * pad) / max(1, x1 - x0)
    sy = (height - 2 * pad) / ((y1 - y0) or 1.0)
    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    parts.append(
        f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" '
        'fill="none" stroke="#ccc"/>'
    )
    parts.append(f'<text x="{pad}" y="{pad - 8}" font-size="11">{y1:.3f}</text>')
    parts.append(f'<text x="{pad}" y="{height - pad + 14}" font-size="11">{y0:.3f}</text>')
    parts.append(
        f'<text x="{width - pad - 60}" y="{height - pad + 14}" font-size="11">step {x1}</text>'
    )
    for i, (name, s) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        coords = " ".join(
            f"{pad + (x - x0) * sx:.1f},{height - pad - (y - y0) * sy:.1f}"
            for x, y in sorted(s.items())
        )
        dash = ' stroke-dasharray="6,4"' if i else ""
        parts.append(
            f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"{dash}/>'
        )
        parts.append(
            f'<text x="{width - pad - 150}" y="{pad + 16 + 14 * i}" font-size="12" '
            f'fill="{color}">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def write_report(
    path: str | Path,
    *,
    title: str,
    summary: Sequence[tuple[str, object]],
    curation: Mapping[str, Any] | None = None,
    loss_curves: Mapping[str, Mapping[int, float]] | None = None,
    resume_rows: Sequence[tuple[int, float, float | None, bool]] | None = None,
    eval_result: Mapping[str, Any] | None = None,
) -> Path:
    """Write the report; returns its path."""
    sections = [f"<h1>{html.escape(title)}</h1>", _table(("", ""), summary)]
    if curation:
        reasons = sorted((curation.get("dropped_by_reason") or {}).items(), key=lambda kv: -kv[1])
        sections += [
            "<h2>Curation: dropped rows by reason</h2>",
            _table(("reason", "rows"), reasons),
        ]
        effect = balance_effect_of(dict(curation))
        if effect and effect.get("top"):
            before, after = effect["max_over_median"]
            sections += [
                "<h2>Balancing: head entries</h2>",
                _table(("entry", "count before", "after"), effect["top"]),
                f"<p>largest entry count / median: {before} before, {after} after</p>",
            ]
    if loss_curves:
        sections += ["<h2>Training loss</h2>", svg_lines(loss_curves)]
    if resume_rows:
        sections += [
            "<h2>Resume check (steps after the resume point)</h2>",
            _table(
                ("step", "reference", "resumed", "bitwise equal"),
                [(s, repr(a), repr(b), "yes" if eq else "NO") for s, a, b, eq in resume_rows],
            ),
        ]
    if eval_result:
        sections += [
            "<h2>Evaluation</h2>",
            f"<pre>{html.escape(json.dumps(eval_result, indent=2, default=str))}</pre>",
        ]
    style = (
        "body{font-family:sans-serif;max-width:900px;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ddd;padding:4px 10px;text-align:left}"
    )
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n"
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc)
    return out
