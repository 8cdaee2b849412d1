"""Jobs on a Ray cluster: submit a recipe as a Ray Job, follow it, stop it, list jobs.

`submit` validates the recipe here (nothing reaches the cluster when it fails), resolves
its paths against this machine's working directory, and submits a Ray Job through the Ray
Jobs SDK (`ray.job_submission.JobSubmissionClient`, the dashboard's HTTP API, port 8265 by
default). The job's runtime env carries the `kiln` package (py_modules, so the cluster runs
this checkout's code) and a working dir holding only the resolved recipe; its entrypoint is
`python -m kiln KIND recipe.yaml`, with `ray.address: auto` in the recipe so the job joins
the cluster it runs on (Ray Jobs sets RAY_ADDRESS for the entrypoint). The cluster's
`python` must have kiln's dependencies installed; the run dir must be a path every node
and this machine see (shared storage) for the outputs to be visible here.

Stopping: `stop_job` asks Ray to stop the job, which sends the entrypoint SIGINT (kiln
sets `RAY_JOB_STOP_SIGNAL=SIGINT` in the job's env) and waits `STOP_GRACE_S` before
SIGKILL. SIGINT is Ctrl-C, so the run ends as an interrupted local run does: its
`status.json` reads `interrupted` (a train run resumes with `kiln resume RUN_DIR`). If the
entrypoint was killed before it could write that, `stop_job` records it from here.

The cluster address is `--address`, else `KILN_ADDRESS`, else `RAY_ADDRESS`: the head's
dashboard URL (`http://HEAD:8265`; `HEAD:8265` means the same).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel

from kiln.console import say
from kiln.platform.recipes import (
    CurateRecipe,
    EvalRecipe,
    TrainRecipe,
    dump_recipe,
    load_recipe,
    recipe_hash,
    resolve_paths,
)
from kiln.platform.runs import read_status, write_status
from kiln.platform.tables import format_kv, format_table

__all__ = [
    "ADDRESS_ENV_VARS",
    "STOP_GRACE_S",
    "JobError",
    "JobInfo",
    "follow_logs",
    "format_job",
    "format_jobs",
    "get_job",
    "job_logs",
    "list_jobs",
    "prepare_recipe",
    "resolve_address",
    "stop_job",
    "submit",
    "wait_for_job",
]

#: Where the cluster address comes from when `--address` is not given, in order.
ADDRESS_ENV_VARS = ("KILN_ADDRESS", "RAY_ADDRESS")
#: Seconds a stopped job's entrypoint gets between SIGINT and SIGKILL: time to abort Ray
#: Train's workers and record `interrupted`.
STOP_GRACE_S = 60
#: How long `submit` / `connect` wait for the dashboard's TCP port before giving up.
CONNECT_TIMEOUT_S = 5.0
#: Ray job states after which nothing changes.
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
#: Metadata keys kiln sets on its jobs (Ray metadata values are strings).
_META = ("kind", "name", "run_dir", "recipe", "recipe_hash")

Recipe = CurateRecipe | TrainRecipe | EvalRecipe


class JobError(ValueError):
    """A job verb cannot go on; the message says what is wrong and how to fix it."""


class JobInfo(BaseModel):
    """One Ray job as kiln shows it (`kiln status`, a row of `kiln jobs`)."""

    id: str
    name: str | None = None
    kind: str | None = None
    status: str
    start: str | None = None
    end: str | None = None
    duration_s: float | None = None
    run_dir: str | None = None
    entrypoint: str = ""
    message: str | None = None
    #: `status.json`'s state of the job's run dir, where this machine can read it
    run_state: str | None = None
    run_error: str | None = None
    dashboard_url: str = ""

    @property
    def terminal(self) -> bool:
        """True once the job has succeeded, failed or been stopped."""
        return self.status in TERMINAL


def resolve_address(address: str | None = None) -> str:
    """The dashboard URL of the cluster: `address`, else KILN_ADDRESS, else RAY_ADDRESS;
    `HOST:PORT` gets `http://`. A clear error when none is set."""
    source = "--address"
    if not address:
        for var in ADDRESS_ENV_VARS:
            if os.environ.get(var):
                address, source = os.environ[var], var
                break
    if not address:
        raise JobError(
            "no cluster address: pass --address http://HEAD:8265 (the Ray head's dashboard) "
            f"or set {' or '.join(ADDRESS_ENV_VARS)}"
        )
    address = address.strip().rstrip("/")
    if address.startswith("ray://") or address == "auto":
        raise JobError(
            f"{source}={address!r} is not a dashboard address: jobs go through the head's "
            "dashboard, e.g. http://HEAD:8265"
        )
    if "://" not in address:
        address = f"http://{address}"
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise JobError(
            f"{source}={address!r} is not an http(s) URL: give the head's dashboard, e.g. "
            "http://HEAD:8265"
        )
    return address


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, when nothing listens at the dashboard's address."""
    parsed = urlparse(address)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise JobError(
            f"cannot reach the Ray cluster at {address} ({why}): check that the cluster is "
            "up and that the address is its head's dashboard (http://HEAD:8265)"
        ) from None


#: Ray's job-client loggers that print INFO lines (package uploads, a closed log stream):
#: kiln says what it does in its own lines instead.
_RAY_CLIENT_LOGGERS = (
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
    "ray._private.runtime_env.packaging",
)


def _quiet_ray_client() -> None:
    for name in _RAY_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _client(address: str | None) -> tuple[Any, str]:
    """A JobSubmissionClient for the cluster, and its dashboard URL."""
    url = resolve_address(address)
    _check_reachable(url)
    from ray.job_submission import JobSubmissionClient

    _quiet_ray_client()
    try:
        return JobSubmissionClient(url), url
    except (ConnectionError, RuntimeError) as e:
        raise JobError(
            f"{url} answers but is not a Ray dashboard with the Jobs API ({e}): give the "
            "head's dashboard address, e.g. http://HEAD:8265"
        ) from None


def _call(what: str, job_id: str, url: str, fn: Callable[[], Any]) -> Any:
    """Run one Jobs API call; a missing job or a lost cluster becomes a JobError."""
    try:
        return fn()
    except RuntimeError as e:
        text = str(e)
        if "404" in text or "does not exist" in text:
            raise JobError(
                f"no job {job_id!r} on the cluster at {url}: `kiln jobs --address {url}` "
                "lists its jobs"
            ) from None
        raise JobError(f"{what} {job_id!r} at {url} failed: {text}") from None
    except ConnectionError as e:
        raise JobError(f"lost the cluster at {url} while asking for {job_id!r}: {e}") from None


def prepare_recipe(recipe_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe as the job will run it: validated, paths absolute on this machine, and
    `ray.address: auto` where the job uses Ray (so it joins the cluster it runs on)."""
    recipe = resolve_paths(load_recipe(recipe_path, overrides))
    if isinstance(recipe, TrainRecipe):
        if recipe.resources.launcher == "torchrun":
            raise JobError(
                f"{recipe_path}: resources.launcher=torchrun needs torchrun or srun to start "
                "every rank; a Ray job starts one process: submit it with launcher ray (Ray "
                "Train workers on the cluster) or local (ranks on one node)"
            )
        uses_ray = recipe.resources.launcher == "ray"
    else:
        uses_ray = isinstance(recipe, CurateRecipe) and recipe.execution.executor != "local"
    if uses_ray:
        recipe = recipe.model_copy(
            update={"ray": recipe.ray.model_copy(update={"address": "auto"})}
        )
    return recipe


def _job_id(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "job"
    return f"kiln-{slug}-{secrets.token_hex(3)}"


def _kiln_package() -> str:
    return str(Path(__file__).resolve().parents[1])


#: Never uploaded with the kiln package (Ray's excludes use .gitignore syntax).
EXCLUDES = ["__pycache__/", "*.pyc", "*.so", ".mypy_cache/", ".ruff_cache/", "*.egg-info/"]


def submit(
    recipe_path: str | Path,
    overrides: list[str] | None = None,
    *,
    address: str | None = None,
    python: str = "python",
) -> JobInfo:
    """Submit a curate / train / eval recipe as a Ray Job; returns the submitted job.

    The recipe is validated first: a bad field raises before anything is submitted.
    """
    recipe = prepare_recipe(recipe_path, overrides)
    client, url = _client(address)
    job_id = _job_id(recipe.name)
    metadata = {
        "kind": recipe.kind,
        "name": recipe.name,
        "run_dir": recipe.run_dir,
        "recipe": str(Path(recipe_path).resolve()),
        "recipe_hash": recipe_hash(recipe),
    }
    with tempfile.TemporaryDirectory(prefix="kiln-job-") as staging:
        dump_recipe(recipe, Path(staging) / "recipe.yaml")
        runtime_env = {
            "working_dir": staging,  # the resolved recipe, nothing else
            "py_modules": [_kiln_package()],
            "excludes": EXCLUDES,
            "env_vars": {
                # Ctrl-C, not SIGTERM: kiln records an interrupted run for it
                "RAY_JOB_STOP_SIGNAL": "SIGINT",
                "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S),
            },
        }
        entrypoint = f"exec {python} -m kiln {recipe.kind} recipe.yaml"
        say(
            f"submitting {recipe.kind} {recipe.name!r} to {url} (kiln code + resolved recipe)",
            stream=sys.stderr,
        )
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=job_id,
                runtime_env=runtime_env,
                metadata={f"kiln_{k}": v for k, v in metadata.items()},
            )
        except (RuntimeError, ConnectionError) as e:
            raise JobError(f"the cluster at {url} refused the job: {e}") from None
    return get_job(job_id, address=url)


def _when(ms: int | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ms / 1000)) if ms else None


def _info(details: Any, url: str) -> JobInfo:
    meta = {
        k.removeprefix("kiln_"): v
        for k, v in (details.metadata or {}).items()
        if k.startswith("kiln_") and k.removeprefix("kiln_") in _META
    }
    start, end = details.start_time, details.end_time
    duration = ((end or time.time() * 1000) - start) / 1000 if start else None
    run_dir = meta.get("run_dir")
    status = read_status(run_dir) if run_dir and Path(run_dir).is_dir() else {}
    job_id = details.submission_id or details.job_id or "?"
    return JobInfo(
        id=job_id,
        name=meta.get("name"),
        kind=meta.get("kind"),
        status=str(getattr(details.status, "value", details.status)),
        start=_when(start),
        end=_when(end),
        duration_s=round(duration, 1) if duration is not None else None,
        run_dir=run_dir,
        entrypoint=details.entrypoint or "",
        message=details.message,
        run_state=status.get("state"),
        run_error=status.get("error"),
        dashboard_url=f"{url}/#/jobs/{job_id}",
    )


def get_job(job_id: str, *, address: str | None = None) -> JobInfo:
    """The job `job_id` (a submission id kiln or Ray gave) and its run's state."""
    client, url = _client(address)
    return _info(_call("reading job", job_id, url, lambda: client.get_job_info(job_id)), url)


def list_jobs(*, address: str | None = None) -> list[JobInfo]:
    """Every submitted job of the cluster, newest first (drivers that were not submitted
    as jobs, e.g. a `kiln train --address`, are left out)."""
    client, url = _client(address)
    try:
        jobs = client.list_jobs()
    except (RuntimeError, ConnectionError) as e:
        raise JobError(f"listing the jobs at {url} failed: {e}") from None
    infos = [_info(j, url) for j in jobs if j.submission_id]
    infos.sort(key=lambda j: j.start or "", reverse=True)
    return infos


def job_logs(job_id: str, *, address: str | None = None) -> str:
    """Everything the job's entrypoint printed so far."""
    client, url = _client(address)
    logs: str = _call("reading the logs of", job_id, url, lambda: client.get_job_logs(job_id))
    return logs


def follow_logs(job_id: str, write: Callable[[str], Any], *, address: str | None = None) -> JobInfo:
    """Stream the job's logs to `write` until it ends; returns the ended job. Ctrl-C
    (KeyboardInterrupt) stops the following, never the job."""
    client, url = _client(address)
    _call("reading job", job_id, url, lambda: client.get_job_info(job_id))

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except (RuntimeError, OSError) as e:  # the stream broke: the job's state says the rest
        say(
            f"log stream of {job_id} ended early ({e}); checking the job's state", stream=sys.stderr
        )
    return wait_for_job(job_id, address=url)


def wait_for_job(
    job_id: str, *, address: str | None = None, timeout_s: float | None = None
) -> JobInfo:
    """Poll until the job is SUCCEEDED / FAILED / STOPPED (or `timeout_s` passed)."""
    client, url = _client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        details = _call("reading job", job_id, url, lambda: client.get_job_info(job_id))
        info = _info(details, url)
        if info.terminal or (deadline is not None and time.monotonic() > deadline):
            return info
        time.sleep(1.0)


def stop_job(job_id: str, *, address: str | None = None) -> tuple[JobInfo, bool]:
    """Stop a job and wait until it has ended; returns the job and whether it was running.

    The entrypoint gets SIGINT and `STOP_GRACE_S` seconds to record an `interrupted` run;
    one killed before it could is recorded here, where its run dir is readable.
    """
    client, url = _client(address)
    was_running = bool(_call("stopping job", job_id, url, lambda: client.stop_job(job_id)))
    if was_running:
        say(
            f"stopping {job_id}: its run gets Ctrl-C and up to {STOP_GRACE_S}s to record it",
            stream=sys.stderr,
        )
    info = wait_for_job(job_id, address=url, timeout_s=STOP_GRACE_S + 30)
    if info.status == "STOPPED" and info.run_dir and info.run_state == "running":
        kind = read_status(info.run_dir).get("kind")
        hint = f"; resume with `kiln resume {info.run_dir}`" if kind == "train" else ""
        write_status(
            info.run_dir,
            "interrupted",
            error=f"stopped by `kiln stop {job_id}` (killed before it could record it){hint}",
        )
        info = _info(_call("reading job", job_id, url, lambda: client.get_job_info(job_id)), url)
    return info, was_running


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_job(job: JobInfo) -> str:
    """`kiln status`: the job's fields, its run's state and the dashboard link."""
    run = job.run_state
    if run and job.run_error:
        run = f"{run}: {job.run_error}"
    pairs: list[tuple[str, object]] = [
        ("id", job.id),
        ("name", job.name),
        ("kind", job.kind),
        ("status", job.status),
        ("start", job.start),
        ("end", job.end),
        ("duration", _duration(job.duration_s)),
        ("run_dir", job.run_dir),
        ("run", run),
        ("message", job.message),
        ("dashboard", job.dashboard_url),
    ]
    return format_kv(pairs)


def format_jobs(jobs: list[JobInfo]) -> str:
    """`kiln jobs`: one row per job, newest first."""
    if not jobs:
        return "no jobs on this cluster"
    header = ("ID", "NAME", "KIND", "STATUS", "START", "DURATION", "RUN_DIR")
    rows = [
        (j.id, j.name, j.kind, j.status, j.start, _duration(j.duration_s), j.run_dir) for j in jobs
    ]
    return format_table(header, rows)
