"""`report.html` of a run: one self-contained page with the plots a person wants to see.

`write_run_report(run_dir)` (`kiln report RUN_DIR`, and the end of every curate, train and
eval job) reads what the run dir holds and writes `{run_dir}/report.html`; a section is
there only when the run has its data:

- every run: kind, name, state, times (`status.json`);
- curation (`curation_stats.json`): the funnel, drops by reason, per-step rows and time,
  the entry-count distribution before/after balancing (log-log, from the dataset's
  balance sidecars), the head entries, and a grid of kept (from the shards) and rejected
  images (rejected rows keep no image bytes: each is read back from its input file by
  `source` / `source_row`) with their captions and drop reasons;
- training (`metrics.jsonl`): loss, learning rate, throughput, gradient norm, data wait
  time and memory per step;
- evaluation (`eval.json`, or the status's `eval`): zero-shot, probe, caption and
  retrieval tables against chance, per-class accuracy, recall@k.

No plotting library: charts are inline SVG written here and images inline base64 JPEG, so
the file opens anywhere, offline, with no other file beside it.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from kiln import storage
from kiln.metrics import read_metrics
from kiln.platform.comparison import COMPARISON_JSON, comparison_markdown, comparison_rows
from kiln.platform.summary import balance_effect_of, eval_rows, funnel_rows

__all__ = [
    "REPORT_FILE",
    "curation_sections",
    "eval_sections",
    "experiment_sections",
    "html_table",
    "render_report",
    "run_sections",
    "svg_bars",
    "svg_lines",
    "train_sections",
    "write_run_report",
]

REPORT_FILE = "report.html"
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
_THUMB_PX = 96
_GRID_KEPT = 12
_GRID_REJECTED = 12
#: metrics.jsonl fields plotted for a training run: (title, {series label: field})
_TRAIN_PLOTS: tuple[tuple[str, dict[str, str]], ...] = (
    ("Loss", {"loss": "loss"}),
    ("Learning rate", {"lr": "lr"}),
    ("Throughput (samples/s)", {"samples/s": "samples_per_s"}),
    ("Gradient norm (before clipping)", {"grad norm": "grad_norm"}),
    ("Time per step (s)", {"step": "step_s", "waiting for data": "data_wait_s"}),
    ("Memory (MiB)", {"RSS": "rss_mb", "CUDA max allocated": "cuda_max_allocated_mb"}),
)


# --------------------------------------------------------------------------- building blocks


def _esc(x: object) -> str:
    return html.escape(str(x))


def html_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """An HTML table (cells escaped; None shows as -)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_esc('-' if c is None else c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _tick(v: float) -> str:
    return f"{v:.4g}"


def svg_lines(
    series: Mapping[str, Mapping[int, float]] | Mapping[str, Mapping[float, float]],
    *,
    width: int = 640,
    height: int = 260,
    log: bool = False,
    x_label: str = "step",
) -> str:
    """x -> y series as an SVG line chart (later series dashed, so overlaps show);
    `log`: both axes logarithmic (points with x or y <= 0 left out)."""

    def tx(v: float) -> float:
        return math.log10(v) if log else v

    clean = {
        name: sorted((float(x), float(y)) for x, y in s.items() if not log or (x > 0 and y > 0))
        for name, s in series.items()
    }
    clean = {k: [p for p in v if math.isfinite(p[1])] for k, v in clean.items()}
    points = [p for s in clean.values() for p in s]
    if not points:
        return "<p>no data</p>"
    xs, ys = [tx(p[0]) for p in points], [tx(p[1]) for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    left, pad = 64, 28
    sx = (width - left - pad) / ((x1 - x0) or 1.0)
    sy = (height - 2 * pad) / ((y1 - y0) or 1.0)
    shown = (lambda v: 10**v) if log else (lambda v: v)
    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'xmlns="http://www.w3.org/2000/svg" font-family="sans-serif">',
        f'<rect x="{left}" y="{pad}" width="{width - left - pad}" height="{height - 2 * pad}" '
        'fill="none" stroke="#ccc"/>',
        f'<text x="{left - 4}" y="{pad + 4}" font-size="11" text-anchor="end">'
        f"{_tick(shown(y1))}</text>",
        f'<text x="{left - 4}" y="{height - pad}" font-size="11" text-anchor="end">'
        f"{_tick(shown(y0))}</text>",
        f'<text x="{left}" y="{height - pad + 16}" font-size="11">{_tick(shown(x0))}</text>',
        f'<text x="{width - pad}" y="{height - pad + 16}" font-size="11" text-anchor="end">'
        f"{_esc(x_label)} {_tick(shown(x1))}</text>",
    ]
    if log:  # a light grid line at every power of ten inside the axes
        for d in range(math.ceil(y0), math.floor(y1) + 1):
            y = height - pad - (d - y0) * sy
            parts.append(
                f'<line x1="{left}" x2="{width - pad}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end" '
                f'fill="#888">{_tick(10.0**d)}</text>'
            )
        for d in range(math.ceil(x0), math.floor(x1) + 1):
            x = left + (d - x0) * sx
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{pad}" y2="{height - pad}" stroke="#eee"/>'
            )
    legend_x = float(left)  # the legend runs along the top, above the plot area
    for i, (name, pts) in enumerate(clean.items()):
        color = _COLORS[i % len(_COLORS)]
        coords = " ".join(
            f"{left + (tx(x) - x0) * sx:.1f},{height - pad - (tx(y) - y0) * sy:.1f}" for x, y in pts
        )
        dash = ' stroke-dasharray="6,4"' if i else ""
        if len(pts) == 1:
            cx, cy = coords.split(",")
            parts.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{color}"/>')
        parts.append(
            f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"{dash}/>'
        )
        parts.append(
            f'<text x="{legend_x:.0f}" y="{pad - 8}" font-size="12" fill="{color}">'
            f"{'- - ' if i else '— '}{_esc(name)}</text>"
        )
        legend_x += 7.5 * (len(name) + 4) + 12
    parts.append("</svg>")
    return "".join(parts)


def svg_bars(pairs: Sequence[tuple[str, float]], *, width: int = 640, unit: str = "") -> str:
    """Horizontal bars, one per (label, value), in the given order."""
    if not pairs:
        return "<p>no data</p>"
    row, label_w, pad = 22, 210, 10
    top = max((v for _, v in pairs), default=0.0) or 1.0
    height = row * len(pairs) + 2 * pad
    span = width - label_w - 2 * pad - 70
    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'xmlns="http://www.w3.org/2000/svg" font-family="sans-serif">'
    ]
    for i, (label, value) in enumerate(pairs):
        y = pad + i * row
        w = max(1.0, span * value / top) if value > 0 else 0.0
        parts.append(
            f'<text x="{label_w}" y="{y + 15}" font-size="12" text-anchor="end">'
            f"{_esc(label)}</text>"
            f'<rect x="{label_w + 6}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" '
            f'fill="{_COLORS[0]}"/>'
            f'<text x="{label_w + 12 + w:.1f}" y="{y + 15}" font-size="12">'
            f"{_esc(_tick(value))}{_esc(unit)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _thumb(image: bytes | None) -> str | None:
    """A JPEG thumbnail as a data: URL, or None when the bytes do not decode."""
    if not image:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as opened:
            rgb = opened.convert("RGB")
        rgb.thumbnail((_THUMB_PX, _THUMB_PX))
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=80)
    except Exception:  # a rejected row's image is often one that does not decode
        return None
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def _grid(cells: Sequence[tuple[str | None, str, str]]) -> str:
    """Figures of (thumbnail data URL or None, caption, note)."""
    figs = []
    for src, caption, note in cells:
        img = f'<img src="{src}" alt="">' if src else '<div class="noimg">no image</div>'
        cap = _esc(caption if len(caption) <= 90 else caption[:87] + "...")
        figs.append(f"<figure>{img}<figcaption>{cap}<b>{_esc(note)}</b></figcaption></figure>")
    return f'<div class="grid">{"".join(figs)}</div>'


# --------------------------------------------------------------------------- curation


def _entry_distribution(dataset_dir: str) -> dict[str, dict[float, float]] | None:
    """Matched-entry counts by rank (descending) before balancing (the pool) and after (the
    dataset), from the dataset's balance sidecars; None without them."""
    import pyarrow.compute as pc

    from kiln.contracts import read_manifest

    try:
        manifest = read_manifest(dataset_dir)
    except (FileNotFoundError, ValueError):
        return None
    if manifest.balance is None:
        return None
    root = dataset_dir.rstrip("/")
    with storage.open_parquet(f"{root}/{manifest.balance.entry_counts.path}") as pf:
        counts = pf.read(columns=["entry_id", "count"])
    with storage.open_parquet(f"{root}/{manifest.balance.sample_entries.path}") as pf:
        ids = pc.list_flatten(pf.read(columns=["entry_ids"]).column("entry_ids")).to_numpy()
    size = int(max(counts.column("entry_id").to_numpy().max(initial=-1), ids.max(initial=-1))) + 1
    before = np.zeros(size, dtype=np.int64)
    before[counts.column("entry_id").to_numpy()] = counts.column("count").to_numpy()
    after = np.bincount(ids.astype(np.int64), minlength=size)

    def by_rank(c: np.ndarray) -> dict[float, float]:
        c = np.sort(c[c > 0])[::-1]
        return {float(i + 1): float(v) for i, v in enumerate(c)}

    return {"before balancing": by_rank(before), "after balancing": by_rank(after)}


def _kept_cells(dataset_dir: str) -> list[tuple[str | None, str, str]]:
    from kiln.training.evaluate import image_member, iter_samples

    cells: list[tuple[str | None, str, str]] = []
    with contextlib.closing(iter_samples(dataset_dir)) as samples:  # type: ignore[type-var]
        for _, key, members in samples:
            text = members.get("txt", b"").decode(errors="replace")
            cells.append((_thumb(image_member(members)), text, key.rsplit("/", 1)[-1][:16]))
            if len(cells) >= _GRID_KEPT:
                break
    return cells


def _source_images(
    source: str, rows: Sequence[int], columns: Sequence[str]
) -> dict[int, bytes | None]:
    """The image bytes of rows `rows` of parquet input file `source`, each row group read
    once for all its rows (empty for other formats, a missing file or no image column)."""
    if not source.endswith(".parquet") or not storage.exists(source):
        return {}
    with storage.open_parquet(source) as pf:
        names = set(pf.schema_arrow.names)
        column = next((c for c in columns if c in names), None)
        if column is None:
            return {}
        found: dict[int, bytes | None] = {}
        start = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            inside = sorted({r for r in rows if start <= r < start + n})
            if inside:
                values = pf.read_row_group(g, columns=[column]).column(0)
                for r in inside:
                    value = values[r - start].as_py()
                    found[r] = value if isinstance(value, bytes) else None
            start += n
    return found


def _rejected_cells(
    run_dir: str, image_columns: Sequence[str]
) -> list[tuple[str | None, str, str]]:
    """A few rejected rows of each drop reason (round robin over reasons), each with its
    image read back from its input file."""
    per_reason: dict[str, list[dict[str, Any]]] = {}
    for step_dir in storage.list_files(f"{run_dir}/rejects"):
        for part in storage.list_files(step_dir, prefix="part-", suffix=".parquet"):
            with storage.open_parquet(part) as pf:
                wanted = [
                    c
                    for c in ("text", "source", "source_row", "drop_reason")
                    if c in pf.schema_arrow.names
                ]
                if pf.metadata.num_row_groups == 0 or "drop_reason" not in wanted:
                    continue
                rows = pf.read_row_group(0, columns=wanted).slice(0, _GRID_REJECTED).to_pylist()
            for r in rows:
                per_reason.setdefault(str(r["drop_reason"]), []).append(r)
    picked: list[dict[str, Any]] = []
    while len(picked) < _GRID_REJECTED and any(per_reason.values()):
        for rows in per_reason.values():
            if rows and len(picked) < _GRID_REJECTED:
                picked.append(rows.pop(0))
    by_source: dict[str, list[int]] = {}
    for r in picked:
        if r.get("source") and r.get("source_row") is not None:
            by_source.setdefault(str(r["source"]), []).append(int(r["source_row"]))
    images = {
        (source, row): image
        for source, rows in by_source.items()
        for row, image in _source_images(source, rows, image_columns).items()
    }
    cells = []
    for r in picked:
        image = None
        if r.get("source") and r.get("source_row") is not None:
            image = images.get((str(r["source"]), int(r["source_row"])))
        cells.append((_thumb(image), str(r.get("text") or ""), str(r["drop_reason"])))
    return cells


def curation_sections(run_dir: str, stats: Mapping[str, Any]) -> list[str]:
    """The curation part of a report from `curation_stats.json` (`stats`) and the run dir."""
    r = dict(stats)
    out = ["<h2>Curation funnel</h2>", html_table(("", "rows"), funnel_rows(r))]
    reasons = sorted((r.get("dropped_by_reason") or {}).items(), key=lambda kv: -kv[1])
    if reasons:
        out += [
            "<h2>Curation: dropped rows by reason</h2>",
            svg_bars([(k, float(v)) for k, v in reasons]),
        ]
    steps = r.get("steps") or {}
    if steps:
        out += [
            "<h2>Curation steps: rows and time</h2>",
            html_table(
                ("step", "rows in", "rows out", "dropped", "seconds", "tasks"),
                [
                    (
                        name,
                        s.get("rows_in"),
                        s.get("rows_out"),
                        sum((s.get("dropped") or {}).values()),
                        "reused" if s.get("reused") else _tick(float(s.get("seconds") or 0)),
                        s.get("tasks"),
                    )
                    for name, s in steps.items()
                ],
            ),
            svg_bars([(n, float(s.get("rows_out") or 0)) for n, s in steps.items()], unit=" rows"),
            svg_bars([(n, float(s.get("seconds") or 0)) for n, s in steps.items()], unit=" s"),
        ]
    dataset = str(r.get("dataset_dir") or f"{run_dir}/dataset")
    distribution = _entry_distribution(dataset)
    if distribution:
        out += [
            "<h2>Entry counts before / after balancing (log-log)</h2>",
            "<p>matches per metadata entry, entries ranked by count: balancing caps the head "
            "at t and keeps the tail</p>",
            svg_lines(distribution, log=True, x_label="entry rank"),
        ]
    effect = balance_effect_of(r)
    if effect and effect.get("top"):
        before, after = effect["max_over_median"]
        out += [
            "<h2>Balancing: head entries</h2>",
            html_table(("entry", "count before", "after"), effect["top"]),
            f"<p>largest entry count / median: {before} before, {after} after</p>",
        ]
    if storage.exists(f"{dataset}/manifest.json"):
        kept = _kept_cells(dataset)
        if kept:
            out += ["<h2>Kept samples</h2>", _grid(kept)]
    recipe = _read_yaml(f"{run_dir}/recipe.yaml")
    image_column = ((recipe.get("input") or {}).get("image_column")) if recipe else None
    rejected = _rejected_cells(run_dir, [c for c in (image_column, "image") if c])
    if rejected:
        out += ["<h2>Rejected samples (with the reason)</h2>", _grid(rejected)]
    return out


def _read_yaml(url: str) -> dict[str, Any] | None:
    import yaml

    raw = storage.read_bytes(url)
    if raw is None:
        return None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------- training, eval


def train_sections(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per-step curves of a training run's `metrics.jsonl` records (a step logged twice,
    redone after a resume, keeps its last value: the one the finished run is built on)."""
    out: list[str] = []
    for title, fields in _TRAIN_PLOTS:
        series: dict[str, dict[float, float]] = {}
        for label, field in fields.items():
            points = {
                float(rec["step"]): float(rec[field])
                for rec in records
                if isinstance(rec.get(field), (int, float)) and isinstance(rec.get("step"), int)
            }
            if points:
                series[label] = points
        if series:
            out += [f"<h2>{_esc(title)}</h2>", svg_lines(series)]
    return out


def eval_sections(result: Mapping[str, Any]) -> list[str]:
    """The evaluation tables (against chance) and the full `eval.json`."""
    rows = eval_rows(dict(result))
    out = ["<h2>Evaluation</h2>"]
    if result.get("model_file"):
        step = f" (step {result['step']})" if result.get("step") is not None else ""
        out.append(f"<p>model: {_esc(result['model_file'])}{_esc(step)}</p>")
    if rows:
        out.append(html_table(("metric", "value", "baseline"), rows))
    for task, t in sorted((result.get("zero_shot") or {}).items()):
        per_class = t.get("per_class") if isinstance(t, dict) else None
        if per_class:
            out += [
                f"<h3>Zero-shot {_esc(task)}: top-1 accuracy per class "
                f"(chance {t.get('chance', 0):.3g})</h3>",
                # a class without held-out samples has no accuracy (None): no bar
                svg_bars(sorted((str(k), float(v)) for k, v in per_class.items() if v is not None)),
            ]
    retrieval = result.get("retrieval") or {}
    curves = {
        way.replace("_", " "): {
            float(k.split("@")[-1]): float(v) for k, v in (retrieval.get(way) or {}).items()
        }
        for way in ("image_to_text", "text_to_image")
        if retrieval.get(way)
    }
    if curves:
        out += ["<h3>Retrieval: recall@k</h3>", svg_lines(curves, x_label="k")]
    out.append(
        "<details><summary>eval.json</summary><pre>"
        f"{_esc(json.dumps(result, indent=2, default=str))}</pre></details>"
    )
    return out


def experiment_sections(doc: Mapping[str, Any]) -> list[str]:
    """An experiment's comparison (`kiln experiment`'s `comparison.json`): the table of its
    arms at equal compute, one bar chart per eval metric, and its notes."""
    header, rows = comparison_rows(dict(doc))
    out = ["<h2>Comparison of the arms (equal compute)</h2>", html_table(header, rows)]
    for col, name in enumerate(header[3:], start=3):
        if "P / R" in name:  # the eval metrics only, not precision / recall pairs
            continue
        values = [(r[0], float(r[col])) for r in rows if r[col] not in ("-", "")]
        if values:
            out += [f"<h3>{_esc(name)}</h3>", svg_bars(values)]
    notes = comparison_markdown(dict(doc)).split("\n\n")[-1]  # the paragraph after the table
    out += [f"<p>{_esc(line)}</p>" for line in notes.strip().splitlines()]
    return out


# --------------------------------------------------------------------------- the page


_STYLE = (
    "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ddd;padding:4px 10px;text-align:left}"
    ".grid{display:flex;flex-wrap:wrap;gap:8px}"
    "figure{margin:0;width:150px;font-size:11px;overflow-wrap:anywhere}"
    "figure img,.noimg{width:96px;height:96px;object-fit:contain;background:#eee;display:block}"
    ".noimg{display:flex;align-items:center;justify-content:center;color:#888}"
    "figcaption b{display:block;color:#a00}"
)


def render_report(url: str, title: str, sections: Sequence[str]) -> str:
    """Write the page (title + sections) to `url` atomically; returns `url`."""
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
        f"<link rel='icon' href='data:,'><style>{_STYLE}</style></head>"
        f"<body><h1>{_esc(title)}</h1>{''.join(sections)}</body></html>\n"
    )
    storage.atomic_write(url, doc.encode())
    return url


def run_sections(run_dir: str) -> list[str]:
    """Every section the run dir has the data for (no title, no summary)."""
    run = run_dir.rstrip("/")
    out: list[str] = []
    stats = storage.read_json(f"{run}/curation_stats.json")
    if isinstance(stats, dict):
        out += curation_sections(run, stats)
    records = [r for r in read_metrics(run) if "loss" in r]
    if records:
        out += train_sections(records)
    result = storage.read_json(f"{run}/eval.json")
    status = storage.read_json(f"{run}/status.json")
    if not isinstance(result, dict) and isinstance(status, dict):  # the status keeps it too
        result = status.get("eval")
    if isinstance(result, dict):
        out += eval_sections(result)
    return out


def write_run_report(run_dir: str) -> str:
    """Write `{run_dir}/report.html` from what the run dir holds; returns its URL. Raises
    FileNotFoundError when `run_dir` is not a kiln run dir."""
    run = str(run_dir).rstrip("/")
    status = storage.read_json(f"{run}/status.json")
    comparison = storage.read_json(f"{run}/{COMPARISON_JSON}")
    if not isinstance(status, dict) and isinstance(comparison, dict):
        title = f"kiln experiment: {comparison.get('name') or run.rsplit('/', 1)[-1]}"
        return render_report(f"{run}/{REPORT_FILE}", title, experiment_sections(comparison))
    if not isinstance(status, dict):
        raise FileNotFoundError(
            f"{run!r} is not a kiln run dir (no status.json): give a folder that `kiln "
            "curate`, `kiln train` or `kiln eval` wrote (`kiln runs` lists them)"
        )
    summary = [
        (key, status.get(key))
        for key in ("kind", "name", "state", "started", "updated", "last_step", "max_steps")
        if status.get(key) is not None
    ]
    if status.get("error"):
        summary.append(("error", status["error"]))
    title = f"kiln {status.get('kind', 'run')}: {status.get('name') or run.rsplit('/', 1)[-1]}"
    return render_report(
        f"{run}/{REPORT_FILE}", title, [html_table(("", ""), summary), *run_sections(run)]
    )
