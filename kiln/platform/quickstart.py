"""`kiln quickstart`: the whole path from raw pool to an evaluated, resumed model, on CPU.

It runs the recipes in `recipes/quickstart/` as a user would, under one root folder:
curate the procedural pool; train an uninterrupted reference; train again, stop part-way on
purpose, resume from the latest checkpoint; check that the resumed losses equal the
reference's; evaluate; print a summary and write `report.html`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from kiln.metrics import read_metrics
from kiln.platform import api, logs
from kiln.platform.ray_cluster import ray_session
from kiln.platform.recipes import (
    CurateRecipe,
    TrainRecipe,
    apply_overrides,
    load_recipe,
    parse_recipe,
)
from kiln.platform.report import html_table, render_report, run_sections, svg_lines
from kiln.platform.runs import read_status
from kiln.platform.summary import eval_rows, format_curation, funnel_rows
from kiln.platform.tables import format_kv, format_table

__all__ = ["compare_losses", "find_recipes_dir", "read_losses", "run_quickstart"]

_DEFAULT_ROOT = "runs/quickstart"


def find_recipes_dir() -> Path:
    """`recipes/` of the source checkout kiln is installed from (editable install)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "recipes" / "quickstart"
        if cand.is_dir():
            return cand.parent
    raise FileNotFoundError(
        "recipes/quickstart/ not found beside the kiln package: run kiln from its source "
        "checkout (`make demo` installs it editable)"
    )


def _rebase(node: Any, old_root: str, new_root: str) -> Any:
    """Replace the recipes' root folder `old_root` (`runs/quickstart` at the repo root, as
    the recipe files name it) by `new_root` in every string."""
    if isinstance(node, dict):
        return {k: _rebase(v, old_root, new_root) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase(v, old_root, new_root) for v in node]
    if isinstance(node, str) and (node == old_root or node.startswith(old_root + os.sep)):
        return new_root + node[len(old_root) :]
    return node


def _load(name: str, root: str, overrides: list[str]) -> Any:
    recipes = find_recipes_dir()
    path = recipes / "quickstart" / f"{name}.yaml"
    default_root = str(recipes.parent / _DEFAULT_ROOT)  # the files' paths, made absolute
    resolved = load_recipe(path).model_dump(mode="json")  # its paths absolute, as it runs
    data = _rebase(resolved, default_root, os.path.abspath(root))
    return parse_recipe(apply_overrides(data, overrides), source=str(path))


def _clear_previous_run(run: Path, name: str) -> None:
    """Remove an earlier quickstart training run so the demo can train from step 0 again.

    Only a folder whose status.json says it is this recipe's run is removed; anything else
    in the way is an error, never deleted.
    """
    if not run.exists():
        return
    status = read_status(run)
    if status.get("name") != name or status.get("kind") != "train":
        raise FileExistsError(
            f"{run} exists and is not a quickstart training run: move it away or pass "
            "another --root"
        )
    print(f"removing the previous quickstart run {run}", flush=True)
    shutil.rmtree(run)


def read_losses(run_dir: str | Path) -> dict[int, float]:
    """step -> loss from `metrics.jsonl`; a step logged twice (redone after a resume) keeps
    its last value, which is the one the finished run is built on."""
    return {
        int(rec["step"]): float(rec["loss"])
        for rec in read_metrics(str(run_dir))
        if "step" in rec and "loss" in rec
    }


def compare_losses(
    reference: dict[int, float], resumed: dict[int, float], after_step: int
) -> tuple[list[tuple[int, float, float | None, bool]], bool]:
    """Per-step (step, reference, resumed, bitwise equal) after `after_step`; all equal?"""
    rows = []
    for step in sorted(s for s in reference if s > after_step):
        other = resumed.get(step)
        rows.append((step, reference[step], other, other == reference[step]))
    return rows, bool(rows) and all(r[3] for r in rows)


def run_quickstart(root: str = _DEFAULT_ROOT, overrides: list[str] | None = None) -> int:
    """Run the demo under `root`; returns the process exit code (0: resume was exact)."""
    t0 = time.time()
    overrides = list(overrides or [])
    root = root.rstrip("/") or "."
    curate = _load("curate", root, [])
    reference = _load(
        "train",
        root,
        [
            f"run_dir={root}/train-reference",
            "eval.zero_shot=null",
            "eval.retrieval=null",
            *overrides,
        ],
    )
    assert isinstance(curate, CurateRecipe) and isinstance(reference, TrainRecipe)
    stop_at = max(1, reference.max_steps // 2)
    interrupted = _load("train", root, [f"stop_after_step={stop_at}", *overrides])
    assert isinstance(interrupted, TrainRecipe)
    for previous in (reference, interrupted):
        _clear_previous_run(Path(previous.run_dir), previous.name)

    logs.attach_run(root)  # Ray starts before the first run dir: its logs go to ROOT/logs/
    with ray_session(curate.ray.address, num_cpus=curate.ray.num_cpus):
        print(f"[1/5] curating the procedural pool into {curate.run_dir}", flush=True)
        cur = api.run_curate(curate)
        print(format_curation(cur.model_dump(mode="json")), flush=True)

        print(f"\n[2/5] training the uninterrupted reference in {reference.run_dir}", flush=True)
        ref_summary = api.run_train(reference)

        print(
            f"\n[3/5] training again in {interrupted.run_dir}, stopping on purpose after "
            f"step {stop_at}",
            flush=True,
        )
        api.run_train(interrupted)
        print(f"\n[4/5] resuming {interrupted.run_dir} from its latest checkpoint", flush=True)
        resumed_summary = api.resume_run(interrupted.run_dir)

    print("\n[5/5] comparing losses after the resume point", flush=True)
    ref_losses = read_losses(reference.run_dir)
    res_losses = read_losses(interrupted.run_dir)
    resume_from = int(resumed_summary.first_step) - 1
    rows, exact = compare_losses(ref_losses, res_losses, resume_from)
    shown = rows if len(rows) <= 8 else rows[:4] + rows[-4:]
    print(
        format_table(
            ("step", "reference loss", "resumed loss", "equal"),
            [(s, repr(a), repr(b), "yes" if eq else "NO") for s, a, b, eq in shown],
        )
    )
    n_equal = sum(r[3] for r in rows)
    verdict = (
        f"resume is exact: {n_equal}/{len(rows)} steps after step {resume_from} bitwise equal"
        if exact
        else f"RESUME MISMATCH: only {n_equal}/{len(rows)} steps equal"
    )
    print(verdict)

    eval_result = json.loads((Path(interrupted.run_dir) / "eval.json").read_text())
    elapsed = time.time() - t0
    _, *funnel = funnel_rows(cur.model_dump(mode="json"))  # each step's drops in order, out
    summary_pairs: list[tuple[str, object]] = [
        ("samples in (raw pool)", cur.samples_in),
        *funnel,
        ("shards", cur.num_shards),
        ("training steps", f"{resumed_summary.last_step} (stopped at {stop_at}, resumed)"),
        ("throughput (samples/s)", f"{ref_summary.samples_per_s:.1f}"),
        ("resume vs reference", "exact" if exact else "MISMATCH"),
    ]
    summary_pairs += [
        (metric, f"{value} ({base})")
        for metric, value, base in eval_rows(eval_result)
        if metric.endswith(("top1", "recall@5"))
    ]
    summary_pairs += [
        ("run dir", root),
        ("report", f"{root}/report.html"),
        ("wall time", f"{elapsed:.0f} s"),
    ]
    report = render_report(
        f"{root}/report.html",
        "kiln quickstart",
        [
            html_table(("", ""), summary_pairs),
            "<h2>Training loss: the reference and the stopped + resumed run</h2>",
            svg_lines({"reference": ref_losses, "stopped + resumed": res_losses}),
            "<h2>Resume check (steps after the resume point)</h2>",
            html_table(
                ("step", "reference", "resumed", "bitwise equal"),
                [(s, repr(a), repr(b), "yes" if eq else "NO") for s, a, b, eq in rows],
            ),
            *run_sections(curate.run_dir),
            *run_sections(interrupted.run_dir),
        ],
    )
    print("\n" + format_kv(summary_pairs, "kiln quickstart summary"))
    runs = ", ".join(str(Path(r.run_dir).name) for r in (curate, reference, interrupted))
    print(f"\noutputs in {root}: report {report}, runs {runs} (each with its logs/)")
    return 0 if exact else 1
