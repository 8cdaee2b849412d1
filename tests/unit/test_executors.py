"""The local executor: real worker processes that run tasks, are killed, fail, and are
reused through completion markers; and how `execution.executor: auto` chooses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from kiln import storage
from kiln.data_curation.executors import LocalExecutor, choose_executor
from kiln.data_curation.stage import StageResources
from kiln.resource_fit import ResourceFitError

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class _Job:
    step: str
    root: str
    fingerprint: str = "f1"
    stage: str = ""

    def marker(self, phase: str, index: int) -> str:
        return f"{self.root}/{phase}-{index}.json"

    def context(self) -> Any:
        return None


def _task(phase: str, job: _Job, index: int, item: dict[str, Any]) -> dict[str, Any]:
    """Doubles `value`; on request kills its own process (once, or always) or raises."""
    Path(job.root, f"ran-{job.fingerprint}-{index}").touch()
    if item.get("kill") == "always" or (
        item.get("kill") == "once" and not Path(job.root, "killed").exists()
    ):
        Path(job.root, "killed").write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    if item.get("raise"):
        raise ValueError(f"row {index} is bad")
    if item.get("sleep"):
        Path(job.root, "sleeping").write_text(str(os.getpid()))
        time.sleep(item["sleep"])
    result = {"v": item["value"] * 2, "pid": os.getpid()}
    storage.write_json(job.marker(phase, index), {"fingerprint": job.fingerprint, "result": result})
    return result


def _env_task(phase: str, job: _Job, index: int, item: dict[str, Any]) -> dict[str, Any]:
    return {"v": os.environ.get(item["name"])}


def test_workers_see_the_environment_of_the_run_not_of_the_forkserver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forkserver starts once per process and keeps its environment: a variable set
    after it (storage credentials a later job sets, as the s3 test found) must still reach
    the workers of a pool started after it."""
    first = LocalExecutor(_env_task, workers=1, start_method="forkserver")
    first.run("apply", _Job("a", str(tmp_path / "a")), [{"name": "KILN_TEST_LATE_VAR"}])
    first.close()  # the forkserver now runs, without the variable
    monkeypatch.setenv("KILN_TEST_LATE_VAR", "set later")
    monkeypatch.delenv("KILN_TEST_GONE_VAR", raising=False)
    ex = LocalExecutor(_env_task, workers=1, start_method="forkserver")
    items = [{"name": "KILN_TEST_LATE_VAR"}, {"name": "KILN_TEST_GONE_VAR"}]
    results, _ = ex.run("apply", _Job("b", str(tmp_path / "b")), items)
    ex.close()
    assert [r["v"] for r in results] == ["set later", None]


def _runs(root: Path) -> int:
    return len(list(root.glob("ran-*")))


@pytest.mark.parametrize("start", ["fork", "forkserver"])
def test_tasks_run_in_worker_processes_and_finished_ones_are_reused(
    tmp_path: Path, start: str
) -> None:
    job = _Job("s", str(tmp_path))
    items = [{"value": i} for i in range(5)]
    ex = LocalExecutor(_task, workers=2, start_method=start)
    results, reused = ex.run("apply", job, items)
    assert [r["v"] for r in results] == [0, 2, 4, 6, 8] and reused == 0
    assert {r["pid"] for r in results}.isdisjoint({os.getpid()})
    again, reused = ex.run("apply", job, items)
    assert again == results and reused == 5 and _runs(tmp_path) == 5
    other = _Job("s", str(tmp_path), fingerprint="f2")  # another config: nothing reused
    assert ex.run("apply", other, items)[1] == 0 and _runs(tmp_path) == 10
    ex.close()


@pytest.mark.parametrize("start", ["fork", "forkserver"])
def test_a_killed_worker_has_its_task_rerun(tmp_path: Path, start: str) -> None:
    """Fork when the driver has no other threads; forkserver (a clean process that forks
    the workers) when it has, e.g. a Ray client's."""
    job = _Job("s", str(tmp_path))
    items = [{"value": i, "kill": "once" if i == 2 else None} for i in range(4)]
    ex = LocalExecutor(_task, workers=2, start_method=start)
    results, _ = ex.run("apply", job, items)
    ex.close()
    assert [r["v"] for r in results] == [0, 2, 4, 6]
    killed = int((tmp_path / "killed").read_text())
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == "zombie"


def test_a_task_that_always_kills_its_worker_is_an_error(tmp_path: Path) -> None:
    job = _Job("s", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"task apply-0 lost its worker process 4 times"):
        LocalExecutor(_task, workers=1).run("apply", job, [{"value": 1, "kill": "always"}])


def test_a_failing_task_raises_its_error_and_stops_the_pool(tmp_path: Path) -> None:
    job = _Job("s", str(tmp_path))
    items = [{"value": 0, "raise": True}, *({"value": i, "sleep": 0.5} for i in range(6))]
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # e.g. a forkserver
    with pytest.raises(ValueError, match="row 0 is bad"):
        LocalExecutor(_task, workers=2, start_method="fork").run("apply", job, items)
    time.sleep(0.2)
    alive = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and p.status() != "zombie"
    ]
    assert alive == [], "the pool's workers outlived the failed phase"
    assert _runs(tmp_path) < len(items), "every queued task still ran after the failure"


def test_resources_a_local_pool_cannot_give_are_refused(tmp_path: Path) -> None:
    job = _Job("big", str(tmp_path))
    ex = LocalExecutor(_task, workers=2)
    with pytest.raises(ResourceFitError, match=r"needs 4 CPUs but the local executor"):
        ex.run("apply", job, [{"value": 1}], resources=StageResources(num_cpus=4))
    with pytest.raises(ResourceFitError, match=r"step big: .* set execution.executor: ray"):
        ex.check_plan([("big", StageResources(num_gpus=1))])
    with pytest.raises(ResourceFitError, match=r"set execution.executor: ray"):
        ex.run("apply", job, [{"value": 1}], resources=StageResources(num_gpus=1))
    with pytest.raises(ValueError, match=r"execution\.workers=0"):
        LocalExecutor(_task, workers=0)


def test_auto_is_local_unless_a_cluster_gpus_or_a_running_ray_ask_for_ray() -> None:
    def auto(**kw: object) -> str:
        return choose_executor("auto", **{"address": None, "needs_gpus": False, **kw})  # type: ignore[arg-type]

    assert auto(in_ray=False) == "local"
    assert auto(address="ray://head:10001", in_ray=False) == "ray"
    assert auto(needs_gpus=True, in_ray=False) == "ray"
    assert auto(in_ray=True) == "ray"  # kiln inside a Ray job or a Ray session
    assert choose_executor("local", address=None, needs_gpus=True, in_ray=True) == "local"
    assert choose_executor("ray", address=None, needs_gpus=False, in_ray=False) == "ray"


_DRIVER = """
import sys
sys.path.insert(0, {repo!r})
from tests.unit.test_executors import LocalExecutor, _Job, _task
LocalExecutor(_task, workers=1).run("apply", _Job("s", {root!r}), [{{"value": 1, "sleep": 60}}])
"""


def test_workers_die_with_a_killed_driver(tmp_path: Path) -> None:
    """A SIGKILLed `kiln curate` leaves no worker behind (they would wait forever)."""
    code = _DRIVER.format(repo=str(REPO), root=str(tmp_path))
    driver = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        while not (tmp_path / "sleeping").exists() and time.time() < deadline:
            assert driver.poll() is None, "the driver exited early"
            time.sleep(0.1)
        worker = int((tmp_path / "sleeping").read_text())
        assert psutil.pid_exists(worker)
    finally:
        driver.kill()
        driver.wait()
    gone = (
        psutil.wait_procs([psutil.Process(worker)], timeout=10)[0]
        if psutil.pid_exists(worker)
        else [worker]
    )
    assert gone, f"worker {worker} outlived its killed driver"


def test_a_jobs_heartbeat_thread_does_not_stop_the_pool_from_forking(tmp_path: Path) -> None:
    """`kiln curate` runs a heartbeat thread; the pool still forks (sharing the driver's
    warmed stage contexts) because that thread holds no lock a worker could need."""
    from kiln.data_curation.executors import _fork_unsafe_threads
    from kiln.platform.runs import heartbeat, write_status

    write_status(tmp_path, "running", kind="curate", name="c")
    before = set(_fork_unsafe_threads())
    with heartbeat(tmp_path, every_s=0.05):
        # the heartbeat adds no thread that would make the pool give up fork (a Ray
        # running in this process, as in the full suite, would: it is not asked here)
        assert set(_fork_unsafe_threads()) == before
        ex = LocalExecutor(_task, workers=1)
        results, _ = ex.run("apply", _Job("s", str(tmp_path)), [{"value": 3}])
        ex.close()
    assert results[0]["v"] == 6
