"""Run directories: the resolved recipe, a status file, and a listing of runs under a root.

Layout of a run dir: `recipe.yaml` (resolved), `status.json`, and what the job writes:
`metrics.jsonl` + `tensorboard/` (every job that measures something, `kiln.metrics`),
`checkpoints/` for training, `steps/` + `dataset/` for curation, `eval.json`,
`report.html` (`kiln.platform.report`), `logs/`.

A running job's `status.json` names its driver process (`driver`: pid, host, start time)
and carries a `heartbeat` (epoch seconds) the driver refreshes every `HEARTBEAT_EVERY_S`
(`heartbeat`). A killed driver leaves `state: running` behind, so `kiln runs` shows such a
run as `dead` when the driver's pid is gone on this host, or `stale` when its heartbeat is
older than `STALE_AFTER_S` (a driver on another host, or one that hangs).

A run dir on object storage (``s3://...``) is written in a local staging folder; while the
job runs, `heartbeat(..., mirror=URL)` copies its status.json up (see `heartbeat` for how
often), so `kiln runs s3://BUCKET/ROOT` shows a live run as running and a dead one as stale
from the bucket alone. `list_runs` reads a local folder or a URL the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from kiln import storage
from kiln.liveness import alive
from kiln.models.checkpoint_index import latest_checkpoint
from kiln.platform.tables import format_table

__all__ = [
    "HEARTBEAT_EVERY_S",
    "MIRROR_EVERY_S",
    "STALE_AFTER_S",
    "RunInfo",
    "eval_headline",
    "format_runs",
    "heartbeat",
    "last_metrics",
    "list_runs",
    "live_state",
    "read_status",
    "write_status",
]

#: How often a running job's driver refreshes `heartbeat` in its status.json.
HEARTBEAT_EVERY_S = 5.0
#: A `running` run whose heartbeat is older than this is shown as `stale`.
STALE_AFTER_S = 60.0
#: How often a running job on object storage copies its status.json (with the heartbeat)
#: up when nothing else changed: a third of `STALE_AFTER_S`, so one late or failed upload
#: does not make a live run look stale, and a dead driver shows stale within ~80 s.
MIRROR_EVERY_S = STALE_AFTER_S / 3
_STATUS = "status.json"
_STATUS_LOCK = threading.Lock()  # the heartbeat thread and the job update one file

RunState = Literal["running", "completed", "stopped", "failed", "interrupted"]


def _write_status_file(run: Path, status: dict[str, Any]) -> None:
    storage.write_json(run / _STATUS, status)


def _join(run_dir: str | Path, name: str) -> str:
    """`name` in run dir `run_dir` (a local folder or a URL)."""
    return f"{os.fspath(run_dir).rstrip('/')}/{name}"


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """`status.json` of a run, a local folder or a URL ({} if there is none yet)."""
    url = _join(run_dir, _STATUS)
    text = storage.read_text(url)
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {"state": "unknown", "error": f"unreadable {url}"}
    return data if isinstance(data, dict) else {}


def write_status(run_dir: str | Path, state: RunState, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into `status.json` with the new state and a timestamp (atomic write)."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    with _STATUS_LOCK:
        status = read_status(run)
        status.update(fields)
        status["state"] = state
        status["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if state == "running":
            status["heartbeat"] = time.time()
        status.setdefault("host", socket.gethostname())
        _write_status_file(run, status)
    return status


def _beat(run: Path) -> bool:
    """Refresh the heartbeat (and a train run's `last_step`, from its metrics) of a
    `running` status; False when the job has recorded how it ended."""
    with _STATUS_LOCK:
        status = read_status(run)
        if status.get("state") != "running":  # the job has recorded how it ended
            return False
        status["heartbeat"] = time.time()
        if status.get("kind") == "train":
            step = (last_metrics(run) or {}).get("step")
            if isinstance(step, int):
                status["last_step"] = step
        _write_status_file(run, status)
        return True


class _Mirror:
    """Copies a staged run's status.json up to its run dir on object storage: at once,
    when the staging folder's latest checkpoint changes (the checkpoint, its metrics and
    the status then agree on the bucket) and otherwise every `MIRROR_EVERY_S`. Not on
    every beat: a request per run every 5 s buys nothing a listing needs (it calls a run
    stale after `STALE_AFTER_S`), and the end of the job copies the whole run dir up."""

    def __init__(self, run: Path, url: str, every_s: float) -> None:
        self.run, self.url, self.every_s = run, url.rstrip("/"), every_s
        self.sent_at: float | None = None
        self.sent_latest: str | None = None

    def _latest(self) -> str | None:
        from kiln.models.checkpoint_index import CHECKPOINTS_DIR, LATEST_FILE

        with contextlib.suppress(OSError):
            return (self.run / CHECKPOINTS_DIR / LATEST_FILE).read_text().strip()
        return None

    def __call__(self, *, force: bool = False) -> None:
        latest = self._latest()
        due = self.sent_at is None or time.monotonic() - self.sent_at >= self.every_s
        if not (force or due or latest != self.sent_latest):
            return
        local = self.run / _STATUS  # replaced by a rename: read whole, old or new
        if local.is_file():
            storage.upload(local, f"{self.url}/{_STATUS}")
            self.sent_at, self.sent_latest = time.monotonic(), latest


@contextlib.contextmanager
def heartbeat(
    run_dir: str | Path,
    every_s: float = HEARTBEAT_EVERY_S,
    *,
    mirror: str | None = None,
    mirror_every_s: float = MIRROR_EVERY_S,
) -> Iterator[None]:
    """Refresh the `running` status's `heartbeat` every `every_s` seconds (a daemon thread)
    for the duration of the block, so `kiln runs` can tell a live job from a dead one.

    `mirror`: the run dir on object storage that local folder `run_dir` stages; its
    status.json follows the local one (`_Mirror`): copied up when the block starts, after
    each new checkpoint, and every `mirror_every_s` seconds."""
    run = Path(run_dir)
    stop = threading.Event()
    send = _Mirror(run, mirror, mirror_every_s) if mirror else None
    if send is not None:
        with contextlib.suppress(Exception):  # (`kiln train` checked the bucket takes writes)
            send(force=True)  # the bucket says `running` from the start

    def loop() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(OSError):  # a full disk must not end the job here
                beating = _beat(run)
            if beating and send is not None and not stop.is_set():
                # nor a bucket that does not answer for a while (the next beat retries)
                with contextlib.suppress(Exception):
                    send()

    thread = threading.Thread(target=loop, name="kiln-heartbeat", daemon=True)
    # it takes no lock a forked worker could need: the local curation executor may still
    # fork (sharing the driver's warmed stage contexts) while it runs (a mirror's upload
    # goes through fsspec's IO loop, whose lock fsspec itself resets in a forked child)
    thread.kiln_fork_safe = True  # type: ignore[attr-defined]
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every_s + 5)


def live_state(status: dict[str, Any], now: float | None = None) -> tuple[str, str | None]:
    """(state, why) of a status: a `running` one whose driver is gone on this host is
    `dead`, one whose heartbeat is older than `STALE_AFTER_S` is `stale`; others as
    recorded (why None)."""
    state = str(status.get("state", "unknown"))
    if state != "running":
        return state, None
    driver = status.get("driver")
    beat = status.get("heartbeat")
    age = (time.time() if now is None else now) - beat if isinstance(beat, (int, float)) else None
    since = f", last heartbeat {age:.0f}s ago" if age is not None else ""
    if isinstance(driver, dict) and alive(driver) is False:
        return "dead", (
            f"driver pid {driver.get('pid')} on {driver.get('host')} is gone{since}: it was "
            "killed; rerun or `kiln resume` it"
        )
    if age is not None and age > STALE_AFTER_S:
        return "stale", (
            f"no heartbeat for {age:.0f}s (driver pid {(driver or {}).get('pid')} on "
            f"{(driver or {}).get('host')}): its driver died or hangs"
        )
    return state, None


def last_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """Last record of `metrics.jsonl` of a local run dir or a URL (reads only the file's
    tail, in one request: a live run rewrites the file on object storage)."""
    try:
        tail = storage.read_tail(_join(run_dir, "metrics.jsonl"), 65536)
    except IsADirectoryError:
        return None
    if tail is None:
        return None
    lines = tail.decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            return rec
    return None


class RunInfo(BaseModel):
    """One row of `kiln runs` (`kiln runs --json` prints these)."""

    path: str
    name: str
    kind: str
    state: str
    last_step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    samples_per_s: float | None = None
    metrics: dict[str, Any] | None = None  # the last record of metrics.jsonl
    eval: str = ""
    latest_checkpoint: str | None = None
    started: str | None = None
    updated: str | None = None
    attempts: int = 0
    error: str | None = None
    summary: str = ""


def eval_headline(report: dict[str, Any] | None) -> str:
    """One line of an evaluation report: zero-shot top-1 per task (with chance) and
    retrieval recall@1 each way; "" when there is none."""
    if not isinstance(report, dict):
        return ""
    parts = []
    for task, res in sorted((report.get("zero_shot") or {}).items()):
        if isinstance(res, dict) and "top1" in res:
            parts.append(f"{task} top1 {res['top1']:.3f} (chance {res.get('chance', 0):.3f})")
    retrieval = report.get("retrieval") or {}
    for way, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
        r1 = (retrieval.get(way) or {}).get("recall@1")
        if r1 is not None:
            parts.append(f"{short} R@1 {r1:.3f}")
    for name, res in sorted((report.get("probe") or {}).items()):
        if isinstance(res, dict):
            parts += [f"{name} {k} {v:.3f}" for k, v in sorted(res.items()) if isinstance(v, float)]
    return ", ".join(parts)


def _latest_checkpoint(run: str) -> str | None:
    if storage.is_remote(run):
        from kiln.training.remote_run import remote_latest

        return remote_latest(run)
    return latest_checkpoint(run)


def _run_info(run: str) -> RunInfo:
    status = read_status(run)
    kind = str(status.get("kind", "?"))
    name = str(status.get("name", run.rstrip("/").rsplit("/", 1)[-1]))
    metrics = last_metrics(run)
    # a curation's records are its plan steps: its progress is its summary, not a step
    trained = metrics if metrics and kind != "curate" else None
    steps = [
        s for s in ((trained or {}).get("step"), status.get("last_step")) if isinstance(s, int)
    ]
    # a run on object storage: its status (copied up every few seconds) may name a later
    # step than its metrics (copied up with each checkpoint)
    last_step = max(steps) if steps else None
    loss = trained.get("loss") if trained else None
    speed = trained.get("samples_per_s") if trained else None
    summary = ""
    if kind == "curate" and "samples_out" in status:
        summary = f"{status.get('samples_in')} in -> {status['samples_out']} kept"
    state, why = live_state(status)
    error = why or (status.get("error") if state in ("failed", "interrupted", "unknown") else None)
    return RunInfo(
        path=run,
        name=name,
        kind=kind,
        state=state,
        last_step=last_step,
        max_steps=status.get("max_steps"),
        loss=loss if isinstance(loss, (int, float)) else None,
        samples_per_s=float(speed) if isinstance(speed, (int, float)) else None,
        metrics=metrics,
        eval=eval_headline(status.get("eval")),
        latest_checkpoint=_latest_checkpoint(run),
        started=status.get("started"),
        updated=status.get("updated"),
        attempts=len(status.get("attempts") or []),
        error=str(error) if error else None,
        summary=summary,
    )


def list_runs(root: str | Path) -> list[RunInfo]:
    """Every run dir (a folder with `status.json`) under `root`, a local folder or a URL
    (``s3://BUCKET/PREFIX``: one listing of the prefix), newest first."""
    base = os.fspath(root)
    remote = storage.is_remote(base)
    storage.check_access(base)  # a bucket or endpoint that does not answer: one line
    if not (storage.exists(base) if remote else os.path.isdir(base)):
        raise FileNotFoundError(f"runs root {base!r} is not a folder")
    statuses = storage.list_files(base, prefix=_STATUS, suffix=_STATUS, recursive=True)
    # each run dir named as the root was given (a listing names files its own way: local
    # paths absolute, memory:// with a leading slash)
    root_path = storage.fs_path(base)[1]
    found = set()
    for url in statuses:
        folder, name = storage.fs_path(url)[1].rsplit("/", 1)
        rel = folder[len(root_path) :].strip("/")
        if name == _STATUS:
            found.add(
                f"{base.rstrip('/')}/{rel}".rstrip("/")
                if remote
                else os.path.normpath(os.path.join(base, rel))
            )
    infos = [_run_info(run) for run in sorted(found)]
    infos.sort(key=lambda r: r.updated or "", reverse=True)
    return infos


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_runs(runs: list[RunInfo]) -> str:
    """A plain-text table of runs for the terminal: state and the last metrics record (step,
    loss, samples/s); NOTE is the curation summary, or the error of a failed or
    interrupted run."""
    if not runs:
        return "no runs found"
    rows = []
    for r in runs:
        step = None
        if r.last_step is not None:
            step = f"{r.last_step}/{r.max_steps}" if r.max_steps else str(r.last_step)
        loss = f"{r.loss:.4f}" if r.loss is not None else None
        speed = f"{r.samples_per_s:.1f}" if r.samples_per_s is not None else None
        note = r.error or r.summary
        if len(note) > 60:
            note = note[:57] + "..."
        rows.append(
            (
                r.path,
                r.kind,
                r.state,
                step,
                loss,
                speed,
                r.eval,
                r.latest_checkpoint,
                r.updated,
                note,
            )
        )
    header = (
        "RUN",
        "KIND",
        "STATE",
        "STEP",
        "LOSS",
        "SAMPLES/S",
        "EVAL",
        "LATEST CKPT",
        "UPDATED",
        "NOTE",
    )
    return format_table(header, rows)
