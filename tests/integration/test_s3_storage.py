"""Every kind of job on object storage, end to end, against a real S3 server on 127.0.0.1
(SeaweedFS) through s3fs, configured the way a user does: AWS_ENDPOINT_URL and keys.

One scenario (each part needs the one before):

1. curate s3 -> s3: the procedural pool is generated into the bucket, read back from it, and
   the run dir (steps, shards, manifest, status) is written there;
2. train from the s3 dataset into an s3 run dir: checkpoints staged locally and copied up
   (COMPLETE marker and `latest` last), metrics on s3; the run is killed after step 3
   (latest complete checkpoint: step 2) and resumed from the bucket alone (its staging
   folder deleted): the replayed step 3 gives the killed attempt's loss exactly (bitwise
   resume at every step and ZeRO stage is tests/integration/test_resume.py's);
3. eval from s3: the run's weights downloaded, zero-shot on the pool's s3 eval set, eval.json
   written back to the bucket;
4. `kiln runs s3://...` (table and --json) lists the three runs from the bucket alone, and
   `kiln report s3://.../train` writes the run's report.html there;

plus: no local folder named `s3:` appears, and a missing bucket or an unreachable endpoint
gives one `[kiln]` line naming the URL and the variables to set.

Beside it: a live run's status.json follows it on the bucket (running, its step) and a
SIGKILLed driver's run is listed as dead (stale from another host); a two-node torchrun
world (two agents on this machine, each "node" with its own KILN_STAGING_DIR) trains into
the bucket, stops, and resumes from the bucket alone with the losses of an uninterrupted
run (and two nodes that share a staging folder both stop with an error saying so).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln import storage
from kiln.platform import api
from kiln.platform.cli import main as kiln_main
from kiln.platform.runs import STALE_AFTER_S, live_state
from kiln.training import TrainLaunchError
from kiln.training.launch import free_port
from kiln.training.loop import FAULT_SIGKILL_AFTER_STEP
from kiln.training.remote_run import complete_remote_checkpoints, remote_latest
from tests.helpers_datasets import curate_recipe
from tests.helpers_s3 import BUCKET, S3_ENV, s3_server
from tests.helpers_training import TINY_MODEL, run_world, short_run_config

pytestmark = pytest.mark.slow

ROOT = f"s3://{BUCKET}/t"
MAX_STEPS = 4


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The server's environment, set in this process (and so in the ranks it starts), and a
    staging root of the module's own."""
    root = tmp_path_factory.mktemp("s3")
    with s3_server(root / "server") as env:
        before = {k: os.environ.get(k) for k in (*S3_ENV, storage.STAGING_ENV)}
        os.environ.update(env)
        os.environ[storage.STAGING_ENV] = str(root / "staging")
        try:
            _wait_for_bucket()
            yield env
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _wait_for_bucket() -> None:
    import time

    deadline = time.monotonic() + 30
    while True:
        try:
            storage.check_access(f"s3://{BUCKET}/probe", write=True)
            return
        except storage.StorageError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _train_recipe(run_dir: str, dataset: str) -> dict[str, Any]:
    return {
        "kind": "train",
        "name": "s3-train",
        "run_dir": run_dir,
        "data": {"dataset": dataset, "batch_size": 4, "num_workers": 1, "shuffle_buffer": 8},
        "model": TINY_MODEL,
        "optim": {"lr": 2e-3, "warmup_steps": 1},
        "checkpoint": {"every_steps": 2, "keep_last": 1},
        "max_steps": MAX_STEPS,
        "log_every": 1,
        "seed": 3,
        "resources": {"workers": 1, "cpus_per_worker": 1, "launcher": "local"},
    }


def _metrics(url: str) -> list[dict[str, Any]]:
    text = storage.read_text(f"{url}/metrics.jsonl") or ""
    return [json.loads(line) for line in text.splitlines()]


def _kiln_runs(capsys: pytest.CaptureFixture[str], root: str) -> dict[str, dict[str, Any]]:
    """`kiln runs ROOT --json`, by run dir."""
    capsys.readouterr()
    assert kiln_main(["runs", root, "--json"]) == 0
    return {r["path"]: r for r in json.loads(capsys.readouterr().out)}


def test_curate_train_resume_eval_on_s3(
    s3: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # where a `Path("s3://...")` would have made a folder

    # 1. curate s3 -> s3
    recipe = curate_recipe(Path("unused"), num_samples=160)
    recipe["run_dir"] = f"{ROOT}/curate"
    recipe["input"]["paths"] = [f"{ROOT}/pool"]
    recipe["input"]["synthetic"]["num_eval"] = 40
    recipe["stages"][2]["entries"] = f"{ROOT}/pool/metadata.txt"
    result = api.curate(recipe)
    dataset = f"{ROOT}/curate/dataset"
    assert result.dataset_dir.rstrip("/") == dataset
    manifest = storage.read_json(f"{dataset}/manifest.json")
    assert manifest["num_samples"] > 0 and manifest["shards"]
    for shard in manifest["shards"]:
        assert storage.exists(f"{dataset}/{shard['path']}")
    assert storage.read_json(f"{ROOT}/curate/status.json")["state"] == "completed"
    assert storage.exists(f"{ROOT}/curate/recipe.yaml")

    # 2. train into s3, killed after step 3 (latest complete checkpoint: step 2), resumed
    # from the bucket alone: the replayed step 3 must give the killed attempt's loss (==)
    # (the recipe itself is read from the bucket, its relative paths resolved beside it)
    url = f"{ROOT}/train"
    recipe_url = f"{ROOT}/recipes/train.yaml"
    storage.atomic_write(
        recipe_url, yaml.safe_dump(_train_recipe("../train", "../curate/dataset")).encode()
    )
    monkeypatch.setenv(FAULT_SIGKILL_AFTER_STEP, "3")
    with pytest.raises(TrainLaunchError):
        api.train(recipe_url)
    monkeypatch.delenv(FAULT_SIGKILL_AFTER_STEP)
    assert remote_latest(url) == "step_00000002"
    assert complete_remote_checkpoints(url) == ["step_00000002"]
    assert storage.read_json(f"{url}/status.json")["state"] == "failed"
    assert storage.exists(f"{url}/recipe.yaml") and storage.list_files(f"{url}/logs")
    killed = _kiln_runs(capsys, ROOT)[url]  # read from the bucket alone
    assert (killed["state"], killed["last_step"], killed["max_steps"]) == ("failed", 3, MAX_STEPS)
    assert killed["latest_checkpoint"] == "step_00000002" and "Error" in killed["error"]
    shutil.rmtree(storage.staging_dir(url))  # resume on "another machine": the bucket only
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        api.train(_train_recipe(url, dataset))  # a fresh run would mix two runs
    resumed = api.resume_run(url)
    assert (resumed.resumed_from, resumed.first_step, resumed.last_step) == (2, 3, MAX_STEPS)
    by_attempt: dict[int, dict[int, float]] = {}
    for rec in _metrics(url):
        by_attempt.setdefault(rec["attempt"], {})[rec["step"]] = rec["loss"]
    assert {a: sorted(steps) for a, steps in by_attempt.items()} == {1: [1, 2, 3], 2: [3, 4]}
    assert by_attempt[2][3] == by_attempt[1][3]  # exact, not approximate
    assert resumed.losses == [by_attempt[2][3], by_attempt[2][4]]
    assert remote_latest(url) == f"step_{MAX_STEPS:08d}"
    assert complete_remote_checkpoints(url) == [f"step_{MAX_STEPS:08d}"]  # keep_last 1
    status = storage.read_json(f"{url}/status.json")
    assert status["state"] == "completed" and len(status["attempts"]) == 2
    # the ranks' logs on the bucket end cleanly: no asyncio "Task exception was never
    # retrieved" from the parent's s3 session closed in a forked loader worker (storage's
    # before-fork hold; without it this fails); the killed rank was SIGKILLed: no output
    rank_logs = storage.list_files(f"{url}/logs", suffix=".log")
    rank_logs = [log for log in rank_logs if "-rank" in log]
    assert rank_logs
    for log in rank_logs:
        text = storage.read_text(log) or ""
        assert "Traceback" not in text and "never retrieved" not in text, text[-3000:]
    exported = api.export(url, None, step=None, fmt="safetensors")  # `kiln export s3://...`
    remote_export = f"{url}/exports/step_{MAX_STEPS:08d}.safetensors"
    assert storage.exists(remote_export)
    assert storage.file_identity(remote_export)[0] == exported.stat().st_size

    # 3. eval from s3: weights and eval set read from the bucket, eval.json written there
    out = api.run_eval(
        api.parse_recipe(
            {
                "kind": "eval",
                "name": "s3-eval",
                "run_dir": f"{ROOT}/eval",
                "checkpoint": url,
                "eval": {"zero_shot": f"{ROOT}/pool/eval"},
            }
        )
    )
    written = storage.read_json(f"{ROOT}/eval/eval.json")
    assert written is not None and written == json.loads(json.dumps(out))
    assert storage.read_json(f"{ROOT}/eval/status.json")["state"] == "completed"

    # 4. `kiln runs` and `kiln report` on the bucket
    runs = _kiln_runs(capsys, ROOT)
    assert set(runs) == {f"{ROOT}/curate", url, f"{ROOT}/eval"}
    assert all(r["state"] == "completed" for r in runs.values())
    assert "kept" in runs[f"{ROOT}/curate"]["summary"]
    trained = runs[url]
    assert (trained["last_step"], trained["latest_checkpoint"]) == (4, f"step_{MAX_STEPS:08d}")
    assert trained["loss"] == resumed.losses[-1] and trained["samples_per_s"] > 0
    assert "top1" in runs[f"{ROOT}/eval"]["eval"]
    assert kiln_main(["runs", ROOT]) == 0
    table = capsys.readouterr().out
    assert f"{url} " in table and f"{MAX_STEPS}/{MAX_STEPS}" in table, table
    storage.remove(f"{url}/report.html")
    assert kiln_main(["report", url]) == 0
    assert f"report: {url}/report.html" in capsys.readouterr().out
    assert "<svg" in (storage.read_text(f"{url}/report.html") or "")

    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir())


def test_live_run_on_s3_is_listed_running_then_dead(
    s3: dict[str, str], short_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """While `kiln train` runs into the bucket its status.json there says `running` with
    the step it reached; once its driver is SIGKILLed the listing says so."""
    url = f"{ROOT}/live"
    spec = _train_recipe(url, short_dataset)
    spec.update(name="s3-live", max_steps=1000, checkpoint={"every_steps": 2, "keep_last": 1})
    recipe = tmp_path / "live.yaml"
    recipe.write_text(yaml.safe_dump(spec))
    log = open(tmp_path / "live.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln", "train", str(recipe)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the driver and its rank, killed together below
    )
    try:
        deadline = time.monotonic() + 300
        status: dict[str, Any] = {}
        while status.get("state") != "running" or (status.get("last_step") or 0) < 2:
            assert proc.poll() is None, (tmp_path / "live.log").read_text()[-4000:]
            assert time.monotonic() < deadline, f"the bucket's status.json: {status}"
            time.sleep(0.5)
            status = storage.read_json(f"{url}/status.json") or {}
        assert status["driver"]["pid"] == proc.pid
        live = _kiln_runs(capsys, url)[url]
        assert live["state"] == "running" and live["last_step"] >= 2, live
        assert live["latest_checkpoint"] is not None and live["samples_per_s"] > 0, live
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    dead = _kiln_runs(capsys, url)[url]
    assert dead["state"] == "dead" and f"pid {proc.pid}" in dead["error"], dead
    # seen from another host (no pid to check) it goes stale once its heartbeat is old
    status = storage.read_json(f"{url}/status.json")
    elsewhere = {**status, "driver": {**status["driver"], "host": "another-host"}}
    assert live_state(elsewhere, now=status["heartbeat"] + 1)[0] == "running"
    assert live_state(elsewhere, now=status["heartbeat"] + STALE_AFTER_S + 1)[0] == "stale"


def test_torchrun_world_on_s3_stops_and_resumes_from_the_bucket(
    s3: dict[str, str], short_dataset: str, short_reference: list[float], tmp_path: Path
) -> None:
    """Two torchrun agents ("nodes" 0 and 1, one rank each, each its own staging folder)
    train steps 1..4 into the bucket and stop; their staging folders are deleted and two
    agents `kiln resume` the run from the bucket to step 6: the losses of the uninterrupted
    2-rank run, exactly. Between the two, a world whose nodes share one staging folder
    stops at its start with the error on both nodes."""
    url = f"{ROOT}/torchrun"
    resources = {"workers": 1, "cpus_per_worker": 1, "launcher": "torchrun"}
    spec = {"kind": "train", "name": "s3-torchrun", "run_dir": url, "resources": resources}
    spec |= short_run_config(short_dataset).model_dump(mode="json")
    recipe = tmp_path / "torchrun.yaml"
    recipe.write_text(yaml.safe_dump(spec, sort_keys=False))
    staging = [tmp_path / f"node{n}-staging" for n in (0, 1)]
    envs = [dict(os.environ, **{storage.STAGING_ENV: str(root)}) for root in staging]

    def world(verb: list[str], name: str, envs: list[dict[str, str]] = envs) -> list[str]:
        agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2"]
        agent += ["--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
        cmd = [*verb, "--launcher", "torchrun"]
        return run_world(
            [[*agent, f"--node_rank={n}", "-m", "kiln", *cmd] for n in (0, 1)],
            envs,
            [tmp_path / f"{name}{n}.log" for n in (0, 1)],
            ok=name != "shared",
        )

    world(["train", str(recipe), "--set", "stop_after_step=4"], "train")
    summary = storage.read_json(f"{url}/train_summary.json")
    assert summary["losses"] == short_reference[:4]  # exact
    assert storage.read_json(f"{url}/status.json")["state"] == "stopped"
    assert remote_latest(url) == "step_00000004"
    # node 1 staged what its rank wrote (never a marker), node 0 the rest; the marker on
    # the bucket lists both nodes' files, and each is there
    node = [root / Path(storage.staging_dir(url)).name for root in staging]
    tag = "checkpoints/step_00000004"
    assert (node[1] / tag / "rng_rank1.pt").is_file() and not (
        node[0] / tag / "rng_rank1.pt"
    ).exists()
    assert not (node[1] / tag / "COMPLETE").exists()
    marker = json.loads(storage.read_text(f"{url}/{tag}/COMPLETE") or "{}")
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= set(marker["files"])
    for name, size in marker["files"].items():
        assert storage.file_identity(f"{url}/{tag}/{name}")[0] == size, name
    assert storage.exists(f"{url}/logs/torchrun-rank1.log")  # node 1's own logs

    # two nodes that share one staging folder are told so, both of them (not one failing
    # while the other waits for it in a collective)
    shared = ["train", str(recipe), "--set", f"run_dir={url}-shared"]
    for out in world(shared, "shared", [envs[0], envs[0]]):
        assert "kiln train: error: staging folder" in out and "set KILN_STAGING_DIR" in out, out

    for root in staging:  # resume on "other machines": the bucket only
        shutil.rmtree(root)
    outs = world(["resume", url], "resume")
    assert "[kiln] resumed from step_00000004" in outs[0]
    ends = [line for line in outs[0].splitlines() if line.startswith("outputs in")]
    assert ends and ends[-1].startswith(f"outputs in {url}: checkpoints {url}/checkpoints"), ends
    summary = storage.read_json(f"{url}/train_summary.json")
    assert (summary["resumed_from"], summary["last_step"]) == (4, 6)
    assert summary["losses"] == short_reference[4:]  # exact
    status = storage.read_json(f"{url}/status.json")
    assert (status["state"], status["last_step"], len(status["attempts"])) == ("completed", 6, 2)


def test_bad_bucket_or_endpoint_is_one_clear_line(
    s3: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "eval.yaml"
    recipe.write_text("kind: eval\nname: e\nrun_dir: s3://no-such-bucket/run\ncheckpoint: x.pt\n")
    assert kiln_main(["eval", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "s3://no-such-bucket/run" in err and "AWS_ENDPOINT_URL" in err, err
    assert "does not exist" in err and "Traceback" not in err, err
    assert kiln_main(["runs", "s3://no-such-bucket/runs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln runs: error: cannot read s3://no-such-bucket/runs"), err
    assert "AWS_ENDPOINT_URL" in err and len(err.strip().splitlines()) == 1, err
    assert kiln_main(["runs", f"{ROOT}/no-such-root"]) == 2
    err = capsys.readouterr().err
    assert f"runs root '{ROOT}/no-such-root' is not a folder" in err and "Traceback" not in err

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    recipe.write_text(f"kind: eval\nname: e\nrun_dir: {ROOT}/bad\ncheckpoint: x.pt\n")
    assert kiln_main(["eval", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{ROOT}/bad" in err and "AWS_ACCESS_KEY_ID" in err, err
    assert "Traceback" not in err, err
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir())


def test_tail_of_a_file_and_last_metrics_on_s3(s3: dict[str, str]) -> None:
    """`kiln runs` reads a live run's metrics tail with one ranged GET (a suffix range):
    seeking in an open s3fs file pins the version seen at open, which the run replaces."""
    from kiln.platform.runs import last_metrics

    url = f"{ROOT}/tail"
    records = [{"step": i, "loss": 1.0 / (i + 1), "pad": "x" * 200} for i in range(400)]
    body = "".join(json.dumps(r) + "\n" for r in records).encode()  # > the 64 KiB tail
    storage.atomic_write(f"{url}/metrics.jsonl", body)
    assert storage.read_tail(f"{url}/metrics.jsonl", 100) == body[-100:]
    assert storage.read_tail(f"{url}/metrics.jsonl", len(body) + 5) == body
    assert last_metrics(url) == records[-1]
    storage.atomic_write(f"{url}/empty", b"")
    assert storage.read_tail(f"{url}/empty", 10) == b""
    assert storage.read_tail(f"{url}/missing", 10) is None
    assert last_metrics(f"{ROOT}/no-run-here") is None
