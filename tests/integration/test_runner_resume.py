"""Per-task completion and fault tolerance of the curation runner, on real LAION alt-texts:
a step redoes only its unfinished tasks, a SIGKILLed Ray worker is retried, a SIGKILLed
`kiln curate` is rerun -- and every time the shards are byte-identical to a clean run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from kiln.contracts import read_manifest
from kiln.data_curation import run_curation
from kiln.data_curation.config import CurationConfig
from kiln.resource_fit import ResourceFitError

REPO = Path(__file__).resolve().parents[2]
ENTRIES = ["the", "of", "and", "for", "with", "in", "to", "on", "by", "Black", "New"]
FILES = 6


@pytest.fixture(scope="module")
def laion_pool(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """600 real alt-texts in 6 parquet files (so every step has 6 tasks), and entries."""
    root = tmp_path_factory.mktemp("laion_pool")
    table = pq.read_table(shared_data / "laion_alttext" / "test_1000.parquet").slice(0, 600)
    for i in range(FILES):
        pq.write_table(table.slice(i * 100, 100), root / f"part-{i}.parquet")
    (root / "entries.txt").write_text("\n".join(ENTRIES) + "\n")
    return {"dir": str(root), "entries": str(root / "entries.txt")}


def _spec(pool: dict[str, str], extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "input": {
            "format": "parquet",
            "paths": [pool["dir"]],
            "text_column": "TEXT",
            "url_column": "URL",
        },
        "plugins": ["tests.helpers_stages"],
        "stages": [
            {"stage": "text"},
            *(extra or []),
            {"stage": "text_dedup"},
            {"stage": "metaclip_match", "entries": pool["entries"]},
            {"stage": "metaclip_balance", "t": 20, "seed": 1},
        ],
        "shard": {"samples_per_shard": 40},
        "execution": {"key_buckets": 3, "shard_rows_per_task": 70},
    }


def _shas(dataset_dir: str) -> list[str]:
    return [s.sha256 for s in read_manifest(dataset_dir).shards]


@pytest.fixture(scope="module")
def reference(
    ray_session: None, laion_pool: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[str]]:
    run = tmp_path_factory.mktemp("reference")
    result = run_curation(CurationConfig.model_validate(_spec(laion_pool)), str(run))
    assert result.samples_out > 40 and result.steps["text"].tasks == FILES
    return run, _shas(result.dataset_dir)


def test_a_half_done_step_redoes_only_its_unfinished_tasks(
    reference: tuple[Path, list[str]], laion_pool: dict[str, str]
) -> None:
    run, shas = reference
    step = run / "steps" / "text"
    (step / "_SUCCESS").unlink()
    for i in (1, 4):  # as if the run died while tasks 1 and 4 were running
        (step / "_tasks" / f"apply-{i:05d}.json").unlink()
        (step / f"part-{i:05d}.parquet").unlink()
    (step / "part-00004.parquet.tmp").write_bytes(b"half a file")
    cfg = CurationConfig.model_validate(_spec(laion_pool))
    again = run_curation(cfg, str(run))
    text = again.steps["text"]
    assert not text.reused and text.tasks == FILES and text.tasks_reused == FILES - 2
    assert again.steps["read"].reused and again.steps["metaclip_balance"].reused
    assert _shas(again.dataset_dir) == shas


def _kiln_curate(tmp_path: Path, spec: dict[str, Any], *sets: str) -> dict[str, Any]:
    """Run `kiln curate` on `spec` as a user would (a fresh process); its curation stats."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"kind": "curate", "name": "t", "run_dir": str(run), **spec}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "kiln.platform.cli", "curate", str(recipe)]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stats: dict[str, Any] = json.loads((run / "curation_stats.json").read_text())
    stats["stderr"] = done.stderr
    return stats


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_a_killed_worker_is_retried_and_changes_nothing(
    reference: tuple[Path, list[str]], laion_pool: dict[str, str], tmp_path: Path, executor: str
) -> None:
    """Ray retries the task of a SIGKILLed worker; so does the local executor (`kiln curate`
    without a cluster: forked workers), which reruns it on a fresh pool."""
    _, shas = reference
    flag = tmp_path / "crashed"
    spec = _spec(laion_pool, [{"stage": "crash_once", "flag": str(flag)}])
    if executor == "ray":
        result = run_curation(CurationConfig.model_validate(spec), str(tmp_path / "run"))
        dataset_dir = result.dataset_dir
    else:
        stats = _kiln_curate(tmp_path, spec)
        assert "a worker process died; rerunning" in stats["stderr"]
        dataset_dir = stats["dataset_dir"]
    assert flag.exists(), "the crash stage never ran"
    assert not psutil.pid_exists(int(flag.read_text())), "the worker was not killed"
    assert _shas(dataset_dir) == shas


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_a_killed_kiln_curate_is_rerun_to_the_same_shards(
    reference: tuple[Path, list[str]], laion_pool: dict[str, str], tmp_path: Path
) -> None:
    _, shas = reference
    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    spec = _spec(laion_pool, [{"stage": "slow", "seconds": 1.5}])
    recipe.write_text(
        yaml.safe_dump({"kind": "curate", "name": "killed", "run_dir": str(run), **spec})
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "kiln.platform.cli", "curate", str(recipe)]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    markers = run / "steps" / "slow" / "_tasks"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and len(list(markers.glob("apply-*.json"))) < 2:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
            time.sleep(0.2)
        assert len(list(markers.glob("apply-*.json"))) >= 2, "the slow step never started"
        assert not (run / "steps" / "slow" / "_SUCCESS").exists()
    finally:
        family = [psutil.Process(proc.pid), *_children(proc.pid)]
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(family, timeout=30)
    done_before = len(list(markers.glob("apply-*.json")))
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step slow: running (resuming its unfinished tasks)" in again.stderr
    stats = json.loads((run / "curation_stats.json").read_text())
    assert stats["steps"]["slow"]["tasks_reused"] >= min(done_before, FILES - 1) >= 2
    assert _shas(stats["dataset_dir"]) == shas


def test_one_cpu_runs_and_an_oversized_stage_is_refused(
    reference: tuple[Path, list[str]], laion_pool: dict[str, str], tmp_path: Path
) -> None:
    """`--set ray.num_cpus=1` used to hang (an actor pool took the only CPU); one local
    worker runs too; a stage asking for more CPUs than there are is an error naming the
    fix, not a wait forever."""
    _, shas = reference
    on_ray = _kiln_curate(
        tmp_path / "ray", _spec(laion_pool), "execution.executor=ray", "ray.num_cpus=1"
    )
    assert _shas(on_ray["dataset_dir"]) == shas
    local = _kiln_curate(tmp_path / "local", _spec(laion_pool), "execution.workers=1")
    assert _shas(local["dataset_dir"]) == shas

    big = _spec(laion_pool)
    big["stages"][0]["resources"] = {"num_cpus": 64}
    with pytest.raises(ResourceFitError, match=r"needs 64 CPUs but the Ray cluster .* 2: lower"):
        run_curation(CurationConfig.model_validate(big), str(tmp_path / "big"))
    big["execution"]["executor"] = "local"
    big["execution"]["workers"] = 2
    with pytest.raises(ResourceFitError, match=r"needs 64 CPUs but the local executor"):
        run_curation(CurationConfig.model_validate(big), str(tmp_path / "big-local"))
