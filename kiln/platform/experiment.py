"""`kiln experiment`: curate one pool several ways, train each at equal compute, compare.

`run_experiment` runs a `kind: experiment` recipe (`kiln.platform.experiment_config`) in
its run dir, in order:

1. generate the pool (`RUN/pool`, with its held-out `eval/` and, when planted, the ground
   truth `planted.json`);
2. when the recipe has `filter:`, curate its clean pool (`RUN/filter/curate`) and train the
   filter model on it (`RUN/filter/train`) with the shared train recipe (plus its own
   overrides): the model the arms' `embed` stages name as `${filter}`;
3. per arm: curate the pool with the arm's plan (`RUN/arms/NAME/curate`), train with the
   shared train recipe (`RUN/arms/NAME/train`: same steps and batch for every arm), and
   evaluate on the pool's held-out set;
4. write `comparison.json` and `comparison.md` (per arm: rows kept, eval metrics, and the
   precision / recall of the planted near-duplicates and mismatches among the rows the
   arm's stages removed) and print the table.

It resumes: curation reuses its finished steps, a train run that finished with the same
recipe (and has its `eval.json`) is not run again, and one stopped part-way is resumed from
its latest checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from kiln import storage
from kiln.console import kiln_stream, say
from kiln.contracts import sha256_hex
from kiln.data_curation.pruning_scores import removed_uids, score_duplicates, score_mismatches
from kiln.data_curation.synthetic import PLANTED_NAME, generate_pool, read_planted
from kiln.models.checkpoint_index import latest_checkpoint
from kiln.platform import api, logs
from kiln.platform.comparison import (
    COMPARISON_JSON,
    COMPARISON_MD,
    comparison_markdown,
    comparison_rows,
)
from kiln.platform.experiment_config import (
    ExperimentRecipe,
    load_experiment,
    substitute,
    variables,
)
from kiln.platform.ray_cluster import ray_session
from kiln.platform.recipes import (
    CurateRecipe,
    RecipeError,
    TrainRecipe,
    apply_overrides,
    load_recipe,
    parse_recipe,
    recipe_hash,
    resolve_paths,
)
from kiln.platform.report import write_run_report
from kiln.platform.runs import read_status
from kiln.platform.tables import format_table

__all__ = [
    "experiment",
    "run_experiment",
]

#: Beside each train run: the recipe hash and dataset it was made from (what a rerun checks).
_INPUTS_NAME = "experiment_inputs.json"


def _curate_recipe(
    exp: ExperimentRecipe, name: str, run_dir: str, pool: dict[str, Any], pool_dir: str,
    stages: list[dict[str, Any]], overrides: list[str],
) -> CurateRecipe:  # fmt: skip
    data = {
        "kind": "curate",
        "name": f"{exp.name}-{name}",
        "run_dir": run_dir,
        "input": {"format": "synthetic", "paths": [pool_dir], "synthetic": pool},
        "stages": substitute(stages, variables(exp.run_dir)),
        "ray": exp.ray.model_dump(mode="json"),
    }
    recipe = parse_recipe(apply_overrides(data, overrides), source=f"{exp.name}: {name}")
    assert isinstance(recipe, CurateRecipe)
    return recipe


def _train_recipe(
    exp: ExperimentRecipe, name: str, run_dir: str, dataset: str, extra: list[str]
) -> TrainRecipe:
    eval_dir = f"{variables(exp.run_dir)['pool']}/eval"
    recipe = load_recipe(
        exp.train.recipe,
        [
            *exp.train.set,
            *extra,
            f"name={exp.name}-{name}",
            f"run_dir={run_dir}",
            f"data.dataset={dataset}",
            f"eval.zero_shot={eval_dir}",
            f"eval.retrieval={eval_dir}",
            "stop_after_step=null",
        ],
    )
    if not isinstance(recipe, TrainRecipe):
        raise RecipeError(
            f"train.recipe {exp.train.recipe!r} is a `kind: {recipe.kind}` recipe: name a "
            "`kind: train` recipe (e.g. recipes/quickstart/train.yaml)"
        )
    return recipe.model_copy(update={"ray": exp.ray})


def _inputs_id(recipe: TrainRecipe) -> dict[str, str]:
    """What a train run of the experiment was made from: its recipe and the bytes of its
    dataset's manifest (a re-curated dataset at the same path is another input)."""
    manifest = Path(recipe.data.dataset) / "manifest.json"
    return {
        "recipe_hash": recipe_hash(resolve_paths(recipe)),
        "dataset_manifest_sha256": sha256_hex(manifest.read_bytes()),
    }


def _train_or_skip(recipe: TrainRecipe) -> dict[str, Any]:
    """Train `recipe` unless its run dir already holds it finished and evaluated on the same
    dataset; resume a run of the same recipe and dataset stopped part-way. Returns the
    run's eval.json."""
    run = Path(recipe.run_dir)
    eval_file = run / "eval.json"
    marker = run / _INPUTS_NAME
    status = read_status(run) if run.exists() else {}
    wanted = _inputs_id(recipe)
    same = marker.is_file() and json.loads(marker.read_text()) == wanted
    ours = marker.is_file() or status.get("name") == recipe.name
    if run.exists() and not ours:  # never remove what this experiment did not write
        raise FileExistsError(
            f"{run} exists and is not a run of this experiment ({status.get('name')!r}): "
            "move it away or choose another experiment run_dir"
        )
    if same and status.get("state") == "completed" and eval_file.is_file():
        say(f"{recipe.name}: trained and evaluated already ({run}), reused")
        return dict(json.loads(eval_file.read_text()))
    if same and latest_checkpoint(str(run)):
        say(f"{recipe.name}: resuming {run} from its latest checkpoint")
        api.run_train(recipe, resume=True)
    else:
        if run.exists():  # our own run, of an older recipe or dataset: redo it
            say(f"{recipe.name}: {run} is of another recipe or dataset: training again")
            shutil.rmtree(run)
        run.mkdir(parents=True)
        storage.write_json(str(marker), wanted)
        api.run_train(recipe)
    return dict(json.loads(eval_file.read_text()))


def _write(run_dir: str, doc: dict[str, Any]) -> None:
    root = run_dir.rstrip("/")
    storage.write_json(f"{root}/{COMPARISON_JSON}", doc)
    storage.atomic_write(f"{root}/{COMPARISON_MD}", comparison_markdown(doc).encode())


def run_experiment(exp: ExperimentRecipe) -> dict[str, Any]:
    """Run every step of `exp` (resuming what is done); returns the comparison document
    written to `RUN/comparison.json`."""
    t0 = time.time()
    exp = resolve_paths(exp)
    where = variables(exp.run_dir)
    pool_cfg = exp.pool.model_dump(mode="json")
    Path(exp.run_dir).mkdir(parents=True, exist_ok=True)
    logs.attach_run(exp.run_dir)
    say(f"experiment {exp.name}: generating the pool into {where['pool']}")
    info = generate_pool(exp.pool, where["pool"])
    truth = read_planted(where["pool"]) if exp.pool.plant is not None else None

    trains = [
        _train_recipe(exp, a.name, f"{exp.run_dir}/arms/{a.name}/train",
                      f"{exp.run_dir}/arms/{a.name}/curate/dataset", [])
        for a in exp.arms
    ]  # fmt: skip
    steps = {t.max_steps for t in trains}
    batches = {(t.data.batch_size, t.resources.workers) for t in trains}
    assert len(steps) == 1 and len(batches) == 1  # one shared recipe: equal compute

    arms_out: list[dict[str, Any]] = []
    filter_eval = None
    filter_steps = None
    with ray_session(exp.ray.address, num_cpus=exp.ray.num_cpus):
        if exp.filter is not None:
            fdir = f"{exp.run_dir}/filter"
            fcur = _curate_recipe(
                exp, "filter-curate", f"{fdir}/curate", exp.filter.pool.model_dump(mode="json"),
                f"{fdir}/pool", exp.filter.stages, [],
            )  # fmt: skip
            say(f"[filter] curating a clean pool into {fcur.run_dir}")
            api.run_curate(fcur)
            ftrain = _train_recipe(
                exp, "filter", where["filter"], f"{fdir}/curate/dataset", exp.filter.set
            )
            filter_steps = ftrain.max_steps
            say(f"[filter] training the filter model in {ftrain.run_dir}")
            filter_eval = _train_or_skip(ftrain)
        for i, (arm, train) in enumerate(zip(exp.arms, trains, strict=True), start=1):
            tag = f"[{i}/{len(exp.arms)} {arm.name}]"
            cur = _curate_recipe(
                exp, arm.name, f"{exp.run_dir}/arms/{arm.name}/curate", pool_cfg,
                where["pool"], arm.stages, arm.set,
            )  # fmt: skip
            say(f"{tag} curating the pool into {cur.run_dir}")
            result = api.run_curate(cur)
            say(f"{tag} {result.samples_out} rows kept; training {train.max_steps} steps")
            eval_result = _train_or_skip(train)
            arm_doc: dict[str, Any] = {
                "name": arm.name,
                "rows_in": result.samples_in,
                "rows_kept": result.samples_out,
                "dropped_by_reason": result.dropped_by_reason,
                "steps": train.max_steps,
                "batch_size": train.data.batch_size,
                "samples_per_step": train.data.batch_size * train.resources.workers,
                "curate_run": cur.run_dir,
                "train_run": train.run_dir,
                "eval": eval_result,
            }
            if truth is not None:
                dups = removed_uids(cur.run_dir, exp.duplicate_reasons)
                mis = removed_uids(cur.run_dir, exp.mismatch_reasons)
                pruned = bool(dups or mis)
                arm_doc["duplicates"] = (
                    score_duplicates(truth["near_duplicates"], dups) if pruned else None
                )
                arm_doc["mismatches"] = (
                    score_mismatches(truth["mismatched"], mis) if pruned else None
                )
            arms_out.append(arm_doc)

    counts = info.get("counts", {})
    doc: dict[str, Any] = {
        "name": exp.name,
        "run_dir": exp.run_dir,
        "pool": pool_cfg,
        "planted": {
            "near_duplicates": counts.get("planted_near_duplicates", 0),
            "mismatched": counts.get("planted_mismatched", 0),
            "ground_truth": f"{where['pool']}/{PLANTED_NAME}" if truth is not None else None,
        },
        "eval_samples": info["eval"]["num_samples"],
        "steps": next(iter(steps)),
        "batch_size": trains[0].data.batch_size,
        "workers": trains[0].resources.workers,
        "samples_per_step": trains[0].data.batch_size * trains[0].resources.workers,
        "duplicate_reasons": exp.duplicate_reasons,
        "mismatch_reasons": exp.mismatch_reasons,
        "filter_eval": filter_eval,
        "filter_steps": filter_steps,
        "arms": arms_out,
        "seconds": round(time.time() - t0, 1),
    }
    _write(exp.run_dir, doc)
    report = write_run_report(exp.run_dir)
    header, rows = comparison_rows(doc)
    say(f"experiment {exp.name}: {len(arms_out)} arms at {doc['steps']} steps x "
        f"{doc['samples_per_step']} samples (equal compute), {doc['seconds']:.0f} s")  # fmt: skip
    stream = kiln_stream()
    stream.write(format_table(header, rows) + "\n")
    stream.flush()
    say(f"comparison written to {exp.run_dir}/{COMPARISON_MD}, {COMPARISON_JSON} and {report}")
    return doc


def experiment(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """`kiln experiment` from Python: load the experiment file (plus `a.b=c` overrides) and
    run it; returns the comparison document."""
    return run_experiment(load_experiment(path, overrides))
