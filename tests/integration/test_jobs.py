"""Jobs on a real Ray cluster: `kiln submit | status | logs | stop | jobs` end to end.

One two-node cluster on 127.0.0.1 (the session's `two_node_cluster`, shared with
tests/integration/test_multinode.py; `tests.helpers_ray_cluster`: a `ray start
--head --block` with its own temp dir, ports and dashboard, plus a worker node; both ended
by pid, never `ray stop`). The cluster's PATH has this venv's `python` first, as a cluster
image would, and the jobs find kiln only because its code travels in the runtime env.

Two job launches cover the behaviour: a quickstart-sized curation submitted with `--wait`
(its dataset on disk), then a train job on that dataset that is followed, left running by a
Ctrl-C of the follower, and stopped (its run reads `interrupted`, its checkpoint is there).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.models.checkpoint_index import latest_checkpoint
from kiln.training.launch import free_port
from tests.helpers_ray_cluster import LoopbackCluster
from tests.helpers_training import TINY_MODEL

pytestmark = pytest.mark.slow

KILN = [sys.executable, "-m", "kiln"]
REPO = Path(__file__).resolve().parents[2]


def kiln(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KILN, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture
def cluster(two_node_cluster: tuple[LoopbackCluster, Any]) -> LoopbackCluster:
    """The session's two-node loopback cluster; its `env` is what a `kiln` client needs
    (the auth token, and KILN_ADDRESS: the verbs below also find the address there)."""
    return two_node_cluster[0]


def job_ids(env: dict[str, str]) -> list[str]:
    return [j["id"] for j in json.loads(ok(kiln("jobs", "--json", env=env)))]


def test_unreachable_address_is_a_clear_error_fast(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KILN_ADDRESS", "RAY_ADDRESS")}
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    proc = kiln("jobs", "--address", closed, env=env)
    assert proc.returncode == 2, proc.stderr
    assert f"kiln jobs: error: cannot reach the Ray cluster at {closed}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60  # generous for a loaded machine; no retry loop
    proc = kiln("status", "some-job", env=env)
    assert proc.returncode == 2
    assert "kiln status: error: no cluster address: pass --address" in proc.stderr


def test_bad_recipe_and_unknown_job(cluster: LoopbackCluster, tmp_path: Path) -> None:
    env = cluster.env
    before = job_ids(env)
    bad = tmp_path / "bad.yaml"
    recipe = yaml.safe_load((REPO / "recipes/quickstart/train.yaml").read_text())
    recipe["optim"]["lrr"] = 0.1
    bad.write_text(yaml.safe_dump(recipe))
    proc = kiln("submit", str(bad), env=env)
    assert proc.returncode == 2
    assert "kiln submit: error:" in proc.stderr and "unknown field 'optim.lrr'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = kiln(
        "submit", str(REPO / "recipes/quickstart/train.yaml"), "--set", "max_steps=0", env=env
    )
    assert proc.returncode == 2 and "max_steps" in proc.stderr
    assert job_ids(env) == before  # nothing was submitted
    for verb in ("status", "logs", "stop"):
        proc = kiln(verb, "kiln-no-such-job", env=env)
        assert proc.returncode == 2, (verb, proc.stderr)
        assert f"kiln {verb}: error: no job 'kiln-no-such-job' on the cluster" in proc.stderr
        assert "Traceback" not in proc.stderr


def follow(job: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    """`kiln logs JOB --follow` in the background; its stdout lines collect in the list."""
    proc = subprocess.Popen(
        [*KILN, "logs", job, "--follow"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
    return proc, lines


def wait_until(check: Any, what: str, run: Path, timeout_s: float = 900) -> None:
    """Poll `check` until it holds; fail at once when `run` failed meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not check():
        # the job makes its run folder a moment before it writes status.json there
        written = (run / "status.json").is_file()
        status = json.loads((run / "status.json").read_text()) if written else {}
        assert status.get("state") in (None, "running"), status
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def test_curate_then_train_stop_on_the_cluster(
    cluster: LoopbackCluster, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    env = cluster.env
    root = tmp_path / "runs"  # absolute: the jobs write where this test reads
    # a quickstart-sized curation (the quickstart recipe, a smaller pool), waited for
    curate = kiln(
        "submit",
        str(REPO / "recipes/quickstart/curate.yaml"),
        "--set", f"run_dir={root}/curate",
        "--set", f"input.paths=[{root}/pool]",
        "--set", f"stages.metaclip_match.entries={root}/pool/metadata.txt",
        "--set", "input.synthetic.num_samples=400",
        "--set", "input.synthetic.num_eval=40",
        "--wait",
        env=env,
        timeout=600,
    )  # fmt: skip
    out = ok(curate)
    curate_id = out.splitlines()[0]
    assert curate_id.startswith("kiln-quickstart-curate-")
    assert f"[kiln] submitted job {curate_id}: curate 'quickstart-curate'" in curate.stderr
    assert f"[kiln] dashboard: {cluster.dashboard_url}/#/jobs/{curate_id}" in curate.stderr
    assert "[kiln] joining the Ray cluster at auto" in out  # the job's own lines, followed
    assert f"[kiln] job {curate_id} SUCCEEDED; run {root}/curate: completed" in curate.stderr
    manifest = json.loads((root / "curate/dataset/manifest.json").read_text())
    assert manifest["num_samples"] > 0
    status = json.loads((root / "curate/status.json").read_text())
    assert (status["state"], status["kind"]) == ("completed", "curate")
    recorded = yaml.safe_load((root / "curate/recipe.yaml").read_text())
    assert recorded["ray"]["address"] == "auto"

    # a train job on that dataset: followed, the follower interrupted, the job stopped
    train = {
        "kind": "train",
        "name": "jobs-train",
        "run_dir": str(root / "train"),
        "resources": {"workers": 2, "cpus_per_worker": 1, "launcher": "ray"},
        "data": {"dataset": str(root / "curate/dataset"), "batch_size": 4, "num_workers": 1},
        "model": TINY_MODEL,
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "max_steps": 100_000,  # runs until it is stopped
        "log_every": 1,
    }
    recipe = tmp_path / "train.yaml"
    recipe.write_text(yaml.safe_dump(train))
    submitted = kiln("submit", str(recipe), env=env)
    train_id = ok(submitted).splitlines()[0]
    # should an assertion below fail, the job that runs until stopped must not outlive this
    # test: the next tests share the cluster (test_multinode checks what it listens on)
    request.addfinalizer(lambda: kiln("stop", train_id, env=env, timeout=300))
    assert f"kiln logs {train_id} --follow" in submitted.stderr
    follower, lines = follow(train_id, env)
    run = root / "train"
    wait_until(lambda: latest_checkpoint(run) is not None, "the train job's first checkpoint", run)
    wait_until(lambda: any("[kiln] step" in ln for ln in lines), "a step line in the logs", run, 60)
    follower.send_signal(signal.SIGINT)  # Ctrl-C: stop following, not the job
    _, err = follower.communicate(timeout=60)
    assert follower.returncode == 130, err
    assert f"stopped following {train_id}; the job keeps running" in err
    assert "Traceback" not in err
    shown = ok(kiln("status", train_id, "--json", env=env))
    assert json.loads(shown)["status"] == "RUNNING"

    stopped = kiln("stop", train_id, env=env, timeout=300)
    text = ok(stopped)
    assert "status     STOPPED" in text and "interrupted" in text
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted", status
    # recorded by the job itself: the stop reached it as Ctrl-C
    assert status["error"] == f"interrupted (KeyboardInterrupt); resume with `kiln resume {run}`"
    assert latest_checkpoint(run) is not None and (run / "metrics.jsonl").is_file()
    again = kiln("stop", train_id, env=env)
    assert "had already ended (STOPPED): nothing to stop" in again.stderr

    table = ok(kiln("jobs", env=env))
    assert table.splitlines()[0].split() == [
        "ID", "NAME", "KIND", "STATUS", "START", "DURATION", "RUN_DIR"
    ]  # fmt: skip
    rows = {j["id"]: j for j in json.loads(ok(kiln("jobs", "--json", env=env)))}
    assert rows[curate_id]["status"] == "SUCCEEDED"
    assert rows[curate_id]["run_dir"] == str(root / "curate")
    assert (rows[train_id]["kind"], rows[train_id]["status"]) == ("train", "STOPPED")
    logs = ok(kiln("logs", train_id, env=env))
    assert "[kiln] step" in logs
    # the Ray launcher's Ctrl-C as a user sees it: the resume command, no traceback
    assert f"kiln resume {run}" in logs and "Traceback" not in logs
