"""Run directories: status files, listing, and the plain-text tables."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.liveness import alive, identity
from kiln.platform.runs import (
    STALE_AFTER_S,
    format_runs,
    heartbeat,
    last_metrics,
    list_runs,
    live_state,
    read_status,
    write_status,
)
from kiln.platform.tables import format_table


def test_status_merges_fields(tmp_path: Path) -> None:
    write_status(tmp_path, "running", kind="train", name="a", max_steps=10)
    write_status(tmp_path, "completed", last_step=10)
    s = read_status(tmp_path)
    assert s["state"] == "completed" and s["kind"] == "train" and s["last_step"] == 10


def test_list_runs_reads_metrics_and_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "exp" / "train"
    write_status(run, "stopped", kind="train", name="t", max_steps=40)
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 19, "loss": 1.0})
        + "\n"
        + json.dumps({"step": 20, "loss": 0.9, "samples_per_s": 12.5})
        + "\n"
    )
    ckpt = run / "checkpoints"
    (ckpt / "step_00000020").mkdir(parents=True)
    (ckpt / "step_00000020" / "COMPLETE").write_text("{}")
    (ckpt / "latest").write_text("step_00000020\n")
    write_status(tmp_path / "cur", "completed", kind="curate", samples_in=10, samples_out=4)
    # a curation's records are its plan steps, not training steps
    (tmp_path / "cur" / "metrics.jsonl").write_text(json.dumps({"step": 8, "name": "shard"}))
    runs = {r.name: r for r in list_runs(tmp_path)}
    assert runs["t"].last_step == 20 and runs["t"].latest_checkpoint == "step_00000020"
    assert runs["t"].state == "stopped" and runs["t"].samples_per_s == 12.5
    assert runs["cur"].last_step is None and runs["cur"].metrics == {"step": 8, "name": "shard"}
    assert "10 in -> 4 kept" in runs["cur"].summary
    text = format_runs(list(runs.values()))
    assert "20/40" in text and "step_00000020" in text and " 12.5 " in text
    assert text.splitlines()[0].split()[4:6] == ["LOSS", "SAMPLES/S"]


def test_incomplete_checkpoint_is_not_reported(tmp_path: Path) -> None:
    write_status(tmp_path, "failed", kind="train", name="t")
    (tmp_path / "checkpoints" / "step_00000005").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000005")
    assert list_runs(tmp_path)[0].latest_checkpoint is None


def test_last_metrics_skips_torn_line(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 3, "loss": 1.5}\n{"step": 4, "lo')
    assert last_metrics(tmp_path) == {"step": 3, "loss": 1.5}


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        list_runs(tmp_path / "nope")


def test_format_table_aligns() -> None:
    out = format_table(("a", "bb"), [(1, None), ("long", 2)]).splitlines()
    assert out[0] == "a     bb"
    assert out[2] == "1     -"
    assert out[3] == "long  2"


# --------------------------------------------------------------------------- dead or alive


def _gone_process() -> dict[str, object]:
    """The identity of a real process that has exited since."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    ident = identity(proc.pid)
    proc.kill()
    proc.wait()
    return ident


def test_running_run_with_a_dead_driver_is_dead(tmp_path: Path) -> None:
    write_status(tmp_path, "running", kind="train", name="t", driver=_gone_process())
    [info] = list_runs(tmp_path)
    assert info.state == "dead"
    assert info.error is not None and "is gone" in info.error and "kiln resume" in info.error
    assert "dead" in format_runs([info])


def test_live_driver_is_running_until_its_heartbeat_is_stale(tmp_path: Path) -> None:
    status = write_status(tmp_path, "running", kind="train", name="t", driver=identity())
    assert live_state(status) == ("running", None)
    state, why = live_state(status, now=status["heartbeat"] + STALE_AFTER_S + 1)
    assert state == "stale" and why is not None and "no heartbeat" in why


def test_driver_on_another_host_goes_by_heartbeat(tmp_path: Path) -> None:
    elsewhere = {"pid": 1, "host": "not-" + socket.gethostname(), "start": 1}
    status = write_status(tmp_path, "running", kind="curate", name="c", driver=elsewhere)
    assert alive(elsewhere) is None
    assert live_state(status)[0] == "running"
    assert live_state(status, now=status["heartbeat"] + STALE_AFTER_S + 1)[0] == "stale"


def test_reused_pid_is_not_the_driver() -> None:
    me = identity()
    assert alive(me) is True
    assert alive({**me, "start": (me["start"] or 0) + 1}) is (me["start"] is None)


def test_ended_runs_keep_their_state(tmp_path: Path) -> None:
    write_status(tmp_path, "running", kind="train", name="t", driver=_gone_process())
    write_status(tmp_path, "completed")
    assert list_runs(tmp_path)[0].state == "completed"


def test_heartbeat_refreshes_a_running_status_and_leaves_an_ended_one(tmp_path: Path) -> None:
    first = write_status(tmp_path, "running", kind="train", name="t")["heartbeat"]
    with heartbeat(tmp_path, every_s=0.05):
        deadline = time.monotonic() + 20
        while read_status(tmp_path)["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_status(tmp_path)["heartbeat"] > first
        write_status(tmp_path, "failed", error="boom")
        time.sleep(0.3)  # beats that come now must not bring `running` back
        assert read_status(tmp_path)["state"] == "failed"


def test_kiln_runs_does_not_import_torch() -> None:
    code = "import sys, kiln.platform.runs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- object storage


def test_list_runs_on_a_url_reads_it_like_a_folder(tmp_path: Path) -> None:
    """The same run dir listed from a local folder and from a copy on fsspec's in-memory
    filesystem (what `kiln runs s3://...` reads through) gives the same rows."""
    from kiln import storage

    run = tmp_path / "exp" / "train"
    write_status(run, "completed", kind="train", name="t", max_steps=40)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 40, "loss": 0.5}) + "\n")
    (run / "checkpoints" / "step_00000040").mkdir(parents=True)
    (run / "checkpoints" / "step_00000040" / "COMPLETE").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_00000040\n")
    url = f"memory://kiln-runs-{uuid.uuid4().hex[:8]}"
    storage.upload_tree(tmp_path, url)
    [local] = list_runs(tmp_path)
    [remote] = list_runs(url)
    assert remote.path == f"{url}/exp/train" and local.path == str(run)
    assert remote.model_dump(exclude={"path"}) == local.model_dump(exclude={"path"})
    assert (remote.last_step, remote.latest_checkpoint) == (40, "step_00000040")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        list_runs(f"{url}/nope")


def test_heartbeat_mirrors_the_status_on_start_new_checkpoint_and_interval(
    tmp_path: Path,
) -> None:
    """Copied up when the heartbeat starts and when the latest checkpoint changes, not on
    every beat; with it the train run's last step (from its metrics)."""
    from kiln import storage

    url = f"memory://kiln-mirror-{uuid.uuid4().hex[:8]}/run"
    write_status(tmp_path, "running", kind="train", name="t")

    def remote() -> dict[str, object]:
        return read_status(url)

    def wait_for(check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 20
        while not check():
            assert time.monotonic() < deadline
            time.sleep(0.02)

    with heartbeat(tmp_path, every_s=0.05, mirror=url, mirror_every_s=3600):
        first = remote()
        assert first["state"] == "running" and "last_step" not in first
        (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 1.0}) + "\n")
        wait_for(lambda: read_status(tmp_path).get("last_step") == 2)
        time.sleep(0.3)  # beats, but nothing new for the bucket
        assert remote() == first
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "latest").write_text("step_00000002\n")
        wait_for(lambda: remote().get("last_step") == 2)
        assert remote()["heartbeat"] > first["heartbeat"]  # type: ignore[operator]
    with heartbeat(tmp_path, every_s=0.05, mirror=url, mirror_every_s=0.1):
        beat = remote()["heartbeat"]
        wait_for(lambda: remote()["heartbeat"] != beat)  # the interval alone
    write_status(tmp_path, "completed")
    assert storage.read_json(f"{url}/status.json")["state"] == "running"  # the job's end pushes
