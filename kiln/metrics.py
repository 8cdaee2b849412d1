"""A run's metrics: `metrics.jsonl` (one JSON record a line) and TensorBoard event files.

Every run dir holds `metrics.jsonl`; training appends one record per step (rank 0),
curation writes one record per plan step. The same numbers go to TensorBoard event files
in `{run_dir}/tensorboard/` (`tensorboard --logdir RUN_DIR`), the tool a trainer's user
opens first: `TensorBoardLog` writes each record's numeric fields as scalars, tagged by
field name, at the record's `step`.

This module is shared by training and the platform layer, so it imports nothing of kiln
but `kiln.storage`.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from typing import Any

from kiln import storage

__all__ = [
    "METRICS_FILE",
    "TENSORBOARD_DIR",
    "TensorBoardLog",
    "memory_stats",
    "read_metrics",
    "scalars_of",
    "write_metrics",
]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
#: fields of a record that locate it rather than measure something
_NOT_SCALARS = frozenset({"step", "attempt", "resumed_from"})


def scalars_of(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric fields of a record (no bools, no `step` / `attempt` / `resumed_from`):
    what TensorBoard plots."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """Every record of `{run_dir}/metrics.jsonl` in file order ([] without one); a line that
    is not a JSON object (a run killed mid-write) is skipped."""
    data = storage.read_bytes(f"{str(run_dir).rstrip('/')}/{METRICS_FILE}")
    if data is None:
        return []
    text = data.decode(errors="replace")
    records = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def memory_stats(device: Any = None) -> dict[str, float]:
    """This process's memory in MiB: `rss_mb` (resident set now; on CPU the memory that
    training uses) and, on a CUDA device, `cuda_max_allocated_mb` (the peak torch has
    allocated on it)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        out["rss_mb"] = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # not Linux: the peak, which getrusage knows
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["rss_mb"] = peak / 2**20 if sys.platform == "darwin" else peak / 1024
    torch = sys.modules.get("torch")
    if torch is not None and device is not None and getattr(device, "type", "") == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


class TensorBoardLog:
    """TensorBoard event files in `{run_dir}/tensorboard/`: `add(record)` writes the
    record's `scalars_of` at its `step`, as one event (TensorBoard's own event writer, which
    queues to a background thread; no torch import, so a curation driver stays light). A
    run dir on object storage gets its events written in a local temporary folder and
    uploaded by `close` (event files are appended to, which object stores cannot do)."""

    def __init__(self, run_dir: str, *, flush_secs: int = 10) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.target = f"{str(run_dir).rstrip('/')}/{TENSORBOARD_DIR}"
        fs, path = storage.fs_path(self.target)
        self._staging: str | None = None
        if storage.is_local(fs):
            log_dir = path
        else:
            self._staging = log_dir = tempfile.mkdtemp(prefix="kiln-tensorboard-")
        self.writer = EventFileWriter(log_dir, flush_secs=flush_secs)

    def add(self, record: Mapping[str, Any]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [
            Summary.Value(tag=tag, simple_value=value) for tag, value in scalars_of(record).items()
        ]
        if values:
            event = Event(wall_time=time.time(), step=int(record["step"]))
            event.summary.value.extend(values)
            self.writer.add_event(event)

    def close(self) -> None:
        self.writer.close()
        if self._staging is not None:
            for name in sorted(os.listdir(self._staging)):
                with open(os.path.join(self._staging, name), "rb") as f:
                    storage.atomic_write(f"{self.target}/{name}", f.read())
            shutil.rmtree(self._staging, ignore_errors=True)

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_metrics(run_dir: str, records: Iterable[Mapping[str, Any]]) -> None:
    """Replace `{run_dir}/metrics.jsonl` with `records` (atomically) and write them as a
    fresh TensorBoard event file (for a job that knows all its records at the end, such
    as curation; earlier event files of the run are removed so a rerun is not plotted
    twice)."""
    records = list(records)
    run = str(run_dir).rstrip("/")
    body = "".join(json.dumps(dict(r), sort_keys=False) + "\n" for r in records)
    storage.atomic_write(f"{run}/{METRICS_FILE}", body.encode())
    with contextlib.suppress(FileNotFoundError):
        storage.remove(f"{run}/{TENSORBOARD_DIR}")
    with TensorBoardLog(run) as tb:
        for r in records:
            tb.add(r)
