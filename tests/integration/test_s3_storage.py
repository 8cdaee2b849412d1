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

plus: no local folder named `s3:` appears, and a missing bucket or an unreachable endpoint
gives one `[kiln]` line naming the URL and the variables to set.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln import storage
from kiln.platform import api
from kiln.platform.cli import main as kiln_main
from kiln.training import TrainLaunchError
from kiln.training.loop import FAULT_SIGKILL_AFTER_STEP
from kiln.training.remote_run import complete_remote_checkpoints, remote_latest
from tests.helpers_datasets import curate_recipe
from tests.helpers_s3 import BUCKET, S3_ENV, s3_server
from tests.helpers_training import TINY_MODEL

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


def test_curate_train_resume_eval_on_s3(
    s3: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
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

    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir())


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

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    recipe.write_text(f"kind: eval\nname: e\nrun_dir: {ROOT}/bad\ncheckpoint: x.pt\n")
    assert kiln_main(["eval", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{ROOT}/bad" in err and "AWS_ACCESS_KEY_ID" in err, err
    assert "Traceback" not in err, err
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir())
