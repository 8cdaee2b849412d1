"""The curation runner: read -> the plan's stages -> shard, as resumable Ray tasks.

Every step is a list of deterministic tasks. A task reads a fixed slice of the step's input
(input files, or row groups of the previous step's parquet parts, about
`execution.rows_per_task` rows), writes its own outputs under fixed names, and then its
completion marker `steps/{name}/_tasks/{phase}-{index}.json` (holding its stats). A rerun
skips finished steps (`_SUCCESS` with the same fingerprint: the hash of the stage, its
config, what its `check` covers and the upstream fingerprint) and, inside an unfinished step,
the tasks that have a marker: a step killed half-way redoes only its unfinished tasks, and
since each task's output depends only on its input slice, the result is byte-identical.

Step kinds (the stage contract, `kiln.data_curation.stage`):
- map: one phase, `apply` per batch;
- fit + apply: `fit` partials per task (`_fit/`), one `merge` task on a worker
  (`state.parquet`), then `apply` with the state;
- keyed: a partition phase writes rows hash-bucketed by key (`_shuffle/b*/`), then one
  task per bucket sorts its keys and calls `apply_groups`; the drop reasons are joined back
  onto the full rows, streamed file by file. A keyed stage that fits (`fits`) runs the
  fit + merge phases first, and its `carry` columns travel with the keys.
The shard step sorts by uid without the driver: tasks sample their uids, the driver picks
range splitters from the samples, tasks scatter rows into uid ranges, each range task sorts
its rows and writes the shards it owns (shard k holds global rows [k*S, (k+1)*S): the global
offset of a range is the prefix sum of the range counts), shards that straddle two ranges
are written as fragments and concatenated. The bytes do not depend on the parallelism.

The driver only plans tasks, collects their small returns (stats, samples, shard infos) and
writes markers for steps; no row passes through it. Kept rows go to `steps/{name}/`,
dropped rows (without image bytes) to `rejects/{name}/`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from kiln import storage
from kiln.contracts import (
    MANIFEST_NAME,
    BalanceSidecars,
    DatasetManifest,
    ShardInfo,
    fnv1a64_strings,
    json_sha256,
    mix64_np,
    read_manifest,
    write_manifest,
)
from kiln.data_curation.balance_index import balance_step, write_balance_sidecars
from kiln.data_curation.blobs import (
    IMAGE_FILE,
    IMAGE_ROW,
    BlobWriter,
    blob_stats,
    load_images,
    split_images,
    store_changed,
)
from kiln.data_curation.config import CurationConfig, ExecutionConfig
from kiln.data_curation.executors import (
    Executor,
    LocalExecutor,
    RayExecutor,
    choose_executor,
)
from kiln.data_curation.plan import PlanStep, step_names
from kiln.data_curation.read_fingerprint import read_fingerprint
from kiln.data_curation.readers import absolute_url, effective_input, input_files, read_file
from kiln.data_curation.shard import (
    ENCODE_ROWS,
    SHARD_DIR,
    ShardFile,
    check_uids,
    encode_samples,
    remove_stale_shards,
)
from kiln.data_curation.stage import KeyedStage, get_stage, load_plugins
from kiln.data_curation.stages import DROP_COLUMN, ensure_drop_column, split_dropped
from kiln.resource_fit import usable_cpus

__all__ = [
    "RUNNER_VERSION",
    "SUCCESS_MARKER",
    "CurationInputs",
    "CurationResult",
    "StepStats",
    "check_curation",
    "executor_kind",
    "make_executor",
    "run_curation",
]

logger = logging.getLogger("kiln.curation")

#: Bump when the runner's outputs change for the same plan: invalidates every marker.
RUNNER_VERSION = 6
SUCCESS_MARKER = "_SUCCESS"
_STEP_MARKER = "_STEP.json"
_KEY = "_key"
_ORDER = ["uid", "source", "source_row"]
_REJECT_DROP = ("image", IMAGE_FILE, IMAGE_ROW)  # left out of rejects (bulky / internal)
_ROW_GROUP_ROWS = 8192
_ROW_GROUP_BYTES = 64 << 20
_MAX_WRITE_THREADS = 4
_DICTIONARY_COLUMNS = frozenset({"source", IMAGE_FILE, DROP_COLUMN, "language"})


class StepStats(BaseModel):
    """What one step did: rows in and out, drops by reason, time, and whether it was reused."""

    name: str
    stage: str = ""
    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)
    seconds: float = 0.0
    reused: bool = False
    tasks: int = 0
    tasks_reused: int = 0
    fingerprint: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)


class CurationResult(BaseModel):
    """Summary of a curation run (also written to `{run_dir}/curation_stats.json`).

    Every input row is either in the dataset or counted once in `dropped_by_reason`:
    `samples_in == samples_out + sum(dropped_by_reason.values())`. `matched` and
    `kept_after_balance` come from the MetaCLIP stages (None when the plan has none).
    """

    samples_in: int
    dropped_by_reason: dict[str, int]
    matched: int | None = Field(default=None, description="rows with a metadata entry")
    kept_after_balance: int | None = None
    deduped: int = Field(description="rows removed by keyed (exact dedup) stages")
    samples_out: int
    num_shards: int
    dataset_dir: str
    manifest_path: str
    steps: dict[str, StepStats]
    seconds: float


# --------------------------------------------------------------------------- task inputs


@dataclass(frozen=True)
class _Slice:
    """Row groups [first, stop) of one parquet file (stop None: to the end)."""

    path: str
    first: int = 0
    stop: int | None = None


def _row_groups(path: str) -> list[int]:
    """Row counts of the row groups of parquet file `path`; errors name the file."""
    try:
        meta = storage.parquet_metadata(path)
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    except (OSError, pa.ArrowException) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(
            f"cannot read {path!r} as parquet: {e} (is input.format right, and is the file "
            "complete?)"
        ) from e


def _chunk(files: list[str], rows_per_task: int) -> list[list[_Slice]]:
    """Task inputs: each file on its own (the upstream's partitioning carries on), a file
    over `rows_per_task` rows cut at row-group boundaries into pieces of about that size."""
    tasks: list[list[_Slice]] = []
    for path in files:
        groups = _row_groups(path)
        start = rows = 0
        for g, n in enumerate(groups):
            if rows and rows + n > rows_per_task:
                tasks.append([_Slice(path, start, g)])
                start, rows = g, 0
            rows += n
        if len(groups) > start:
            tasks.append([_Slice(path, start, len(groups))])
    return tasks


def _iter_slices(
    slices: list[_Slice], batch_rows: int, columns: list[str] | None = None
) -> Iterator[pa.Table]:
    for s in slices:
        with storage.open_parquet(s.path) as pf:
            stop = pf.num_row_groups if s.stop is None else s.stop
            for rb in pf.iter_batches(
                batch_size=batch_rows, row_groups=range(s.first, stop), columns=columns
            ):
                yield pa.Table.from_batches([rb])


# --------------------------------------------------------------------------- task outputs


class _Parquet:
    """A parquet file written under a temporary name in row groups of ~8k rows / 64 MB,
    renamed into place by `close` (nothing is written for zero rows)."""

    def __init__(self, url: str, *, keep_empty: bool = False) -> None:
        self.url = url
        self._keep_empty = keep_empty
        self._buffer: list[pa.Table] = []
        self._rows = 0
        self._bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._file: Any = None
        self._schema: pa.Schema | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0 and not (self._keep_empty and self._schema is None):
            return
        if self._schema is None:
            self._schema = table.schema
        elif table.schema != self._schema:
            table = table.cast(self._schema)
        self._buffer.append(table)
        self._rows += table.num_rows
        self._bytes += table.nbytes
        self.rows += table.num_rows
        if self._rows >= _ROW_GROUP_ROWS or self._bytes >= _ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer or (self._writer is not None and not self._rows):
            return
        table = pa.concat_tables(self._buffer)
        if self._writer is None:
            self._file = storage.AtomicFile(self.url)
            # Step files are read back once: cheap settings over small ones. Image bytes (in
            # the shard step's scatter files) are compressed already; a dictionary only
            # pays for the few columns with repeated values (40% of the write time else).
            names = table.column_names
            self._writer = pq.ParquetWriter(
                self._file.file,
                table.schema,
                compression={n: "none" if n == "image" else "snappy" for n in names},
                use_dictionary=[n for n in names if n in _DICTIONARY_COLUMNS],
            )
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self._buffer, self._rows, self._bytes = [], 0, 0

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._file.commit()
        else:
            storage.remove(self.url)  # an earlier attempt's output, if any


@dataclass
class _Out:
    """What a stage task writes: kept rows, rejects, per-task summaries; and its stats."""

    data_url: str
    rejects_url: str | None
    summary_url: str | None
    rows_in: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kept = _Parquet(self.data_url)
        self.rejects = _Parquet(self.rejects_url) if self.rejects_url else None
        self.summaries: list[pa.Table] = []

    def add(self, table: pa.Table, rows_in: int) -> pa.Table:
        self.rows_in += rows_in
        kept, rejected = split_dropped(ensure_drop_column(table))
        for reason, n in _reason_counts(rejected).items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n
        if self.rejects is not None and rejected.num_rows:
            self.rejects.write(
                rejected.drop_columns([c for c in _REJECT_DROP if c in rejected.column_names])
            )
        kept = kept.drop_columns([DROP_COLUMN])
        self.kept.write(kept)
        return kept

    def close(self) -> dict[str, Any]:
        self.kept.close()
        if self.rejects is not None:
            self.rejects.close()
        if self.summary_url is not None:
            parts = [s for s in self.summaries if s is not None]
            if parts:
                storage.atomic_write(self.summary_url, _ipc(pa.concat_tables(parts)))
            else:
                storage.remove(self.summary_url)
        return {
            "rows_in": self.rows_in,
            "rows_out": self.kept.rows,
            "dropped": dict(sorted(self.dropped.items())),
        }


def _reason_counts(rejected: pa.Table) -> dict[str, int]:
    if rejected.num_rows == 0:
        return {}
    counts = pc.value_counts(rejected.column(DROP_COLUMN).combine_chunks())
    return {c["values"]: int(c["counts"]) for c in counts.to_pylist() if c["values"] is not None}


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _read_ipc(url: str) -> pa.Table:
    with fsspec.open(url, "rb") as f:
        return pa.ipc.open_file(pa.BufferReader(f.read())).read_all()


def _read_table(url: str) -> pa.Table:
    with storage.open_parquet(url) as pf:
        return pf.read()


# --------------------------------------------------------------------------- worker side

_CONTEXTS: dict[str, Any] = {}


@dataclass(frozen=True)
class _Job:
    """What every task of a step needs to know (small; shipped with each task)."""

    step: str
    step_dir: str
    rejects_dir: str | None
    fingerprint: str
    stage: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    batch_rows: int = 256
    buckets: int = 1
    state_url: str | None = None
    plugins: tuple[str, ...] = ()

    def stage_and_config(self) -> tuple[Any, Any]:
        load_plugins(self.plugins)
        stage = get_stage(self.stage)
        return stage, stage.config.model_validate(self.config)

    def context(self) -> Any:
        """The stage's `setup` result, built once per worker process and reused."""
        key = json_sha256([self.stage, self.config, self.state_url])
        if key not in _CONTEXTS:
            stage, cfg = self.stage_and_config()
            state = _read_table(self.state_url) if self.state_url else None
            if len(_CONTEXTS) > 4:
                _CONTEXTS.clear()
            _CONTEXTS[key] = stage.setup(cfg, state)
        return _CONTEXTS[key]

    def marker(self, phase: str, index: int) -> str:
        return f"{self.step_dir}/_tasks/{phase}-{index:05d}.json"

    def part(self, index: int) -> str:
        return f"{self.step_dir}/part-{index:05d}.parquet"

    def rejects(self, index: int) -> str | None:
        return f"{self.rejects_dir}/part-{index:05d}.parquet" if self.rejects_dir else None

    def blobs(self, index: int) -> str:
        return f"{self.step_dir}/blobs/part-{index:05d}.arrow"

    def summary(self, index: int) -> str:
        return f"{self.step_dir}/_summary/part-{index:05d}.arrow"


def _finish(job: _Job, phase: str, index: int, result: dict[str, Any]) -> dict[str, Any]:
    storage.write_json(job.marker(phase, index), {"fingerprint": job.fingerprint, "result": result})
    return result


def _task_read(job: _Job, index: int, item: dict[str, Any]) -> dict[str, Any]:
    """Read one input file (or row groups of one): kept rows to the part, the rows the reader
    could not use to rejects (counted by reason), images to the task's blob file. At most
    `item["max_rows"]` rows when given (`input.limit` cutting this task), else `cfg.limit`."""
    from kiln.data_curation.config import InputConfig

    cfg = InputConfig.model_validate(job.config)
    out = _Out(job.part(index), job.rejects(index), None)
    blobs = BlobWriter(job.blobs(index))
    row_groups = tuple(item["row_groups"]) if item.get("row_groups") else None
    max_rows = item.get("max_rows", cfg.limit)
    for table in read_file(item["path"], cfg, max_rows, row_groups=row_groups):
        out.add(split_images(table, blobs), table.num_rows)
    blobs.close()
    return _finish(job, "read", index, out.close())


def _task_map(job: _Job, index: int, item: dict[str, Any]) -> dict[str, Any]:
    stage, cfg = job.stage_and_config()
    ctx = job.context()
    out = _Out(job.part(index), job.rejects(index), job.summary(index))
    blobs = BlobWriter(job.blobs(index)) if stage.images else None
    for table in _iter_slices([_Slice(**s) for s in item["slices"]], job.batch_rows):
        if blobs is not None and IMAGE_FILE in table.column_names:
            refs = table.select([IMAGE_FILE, IMAGE_ROW])
            given = load_images(table)
            result = stage.apply(given, cfg, ctx)
            result = store_changed(given.column("image"), result, blobs, refs)
        else:
            result = stage.apply(table, cfg, ctx)
        kept = out.add(result, table.num_rows)
        if kept.num_rows:
            out.summaries.append(stage.summarize(kept, cfg, ctx))
    if blobs is not None:
        blobs.close()
    return _finish(job, "apply", index, out.close())


def _task_fit(job: _Job, index: int, item: dict[str, Any]) -> dict[str, Any]:
    stage, cfg = job.stage_and_config()
    ctx = job.context()
    partials = [
        stage.fit(t, cfg, ctx)
        for t in _iter_slices([_Slice(**s) for s in item["slices"]], job.batch_rows)
    ]
    merged = stage.merge(partials, cfg) if partials else None
    url = f"{job.step_dir}/_fit/part-{index:05d}.arrow"
    if merged is not None:
        storage.atomic_write(url, _ipc(merged))
    return _finish(job, "fit", index, {"partial": url if merged is not None else None})


def _task_merge(job: _Job, index: int, item: dict[str, Any]) -> dict[str, Any]:
    stage, cfg = job.stage_and_config()
    state = stage.finish(stage.merge([_read_ipc(u) for u in item["partials"]], cfg), cfg)
    out = _Parquet(item["state_url"], keep_empty=True)
    out.write(state)
    out.close()
    return _finish(job, "merge", index, {"state_rows": state.num_rows})


def _bucket_of(keys: pa.Array, uids: pa.Array, buckets: int) -> np.ndarray:
    """Hash bucket of each key (of its uid when the key is null), vectorized."""
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    if not (pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type)):
        keys = pc.cast(keys, pa.string())
    h = fnv1a64_strings(keys)
    if keys.null_count:
        null = np.asarray(keys.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        h[null] = fnv1a64_strings(uids.filter(pa.array(null)))
    return (mix64_np(h) % np.uint64(buckets)).astype(np.int64)


def _task_partition(job: _Job, index: int, item: dict[str, Any]) -> dict[str, Any]:
    """Keyed stage, phase 1: each row's key, order columns and position (task, row) into
    hash buckets; the rows themselves stay where they are."""
    stage, cfg = job.stage_and_config()
    ctx = job.context()
    writers: dict[int, _Parquet] = {}
    row = 0
    for table in _iter_slices([_Slice(**s) for s in item["slices"]], job.batch_rows):
        n = table.num_rows
        keys = stage.key(table, cfg, ctx)
        buckets = _bucket_of(keys, table.column("uid").combine_chunks(), job.buckets)
        index_table = table.select([*_ORDER, *stage.carry(cfg)]).append_column(_KEY, keys)
        index_table = index_table.append_column("_part", pa.array(np.full(n, index, np.int32)))
        index_table = index_table.append_column("_row", pa.array(np.arange(row, row + n)))
        row += n
        for b in np.unique(buckets):
            url = f"{job.step_dir}/_shuffle/b{int(b):04d}/from-{index:05d}.parquet"
            writers.setdefault(int(b), _Parquet(url)).write(
                index_table.filter(pa.array(buckets == b))
            )
    for w in writers.values():
        w.close()
    return _finish(job, "partition", index, {"buckets": sorted(writers)})


def _task_group(job: _Job, index: int, item: dict[str, Any]) -> dict[str, Any]:
    """Keyed stage, phase 2: one bucket's keys sorted by (key, uid, source, source_row),
    `apply_groups`, and the drop reasons written back per source task."""
    stage, cfg = job.stage_and_config()
    ctx = job.context()
    files: list[str] = item["files"]
    parts = [_read_table(u) for u in files]
    marked_parts: list[int] = []
    if parts:
        keyed = pa.concat_tables(parts).sort_by(
            [(_KEY, "ascending"), *((c, "ascending") for c in _ORDER)]
        )
        keys = keyed.column(_KEY).combine_chunks()
        marked = ensure_drop_column(stage.apply_groups(keyed.drop_columns([_KEY]), keys, cfg, ctx))
        summary = stage.summarize_groups(marked, keys, cfg, ctx)
        if summary is not None:
            storage.atomic_write(f"{job.step_dir}/_summary/group-{index:05d}.arrow", _ipc(summary))
        dropped = marked.filter(pc.is_valid(marked.column(DROP_COLUMN)))
        for p in np.unique(dropped.column("_part").to_numpy()):
            mine = dropped.filter(pc.equal(dropped.column("_part"), int(p)))
            url = f"{job.step_dir}/_decisions/p{int(p):05d}/b{index:04d}.parquet"
            w = _Parquet(url)
            w.write(mine.select(["_row", DROP_COLUMN]))
            w.close()
            marked_parts.append(int(p))
    return _finish(job, "group", index, {"parts": marked_parts})


def _task_join(job: _Job, index: int, item: dict[str, Any]) -> dict[str, Any]:
    """Keyed stage, phase 3: task `index`'s rows, in their order, with the drop reasons the
    groups gave them."""
    stage, cfg = job.stage_and_config()
    ctx = job.context()
    decided = [_read_table(u) for u in item["decisions"]]
    decisions = (
        pa.concat_tables(decided).sort_by("_row")
        if decided
        else pa.table({"_row": pa.array([], pa.int64()), DROP_COLUMN: pa.array([], pa.string())})
    )
    rows = decisions.column("_row").to_numpy()
    reasons = decisions.column(DROP_COLUMN).combine_chunks()
    out = _Out(job.part(index), job.rejects(index), job.summary(index))
    start = 0
    for table in _iter_slices([_Slice(**s) for s in item["slices"]], job.batch_rows):
        n = table.num_rows
        lo, hi = np.searchsorted(rows, [start, start + n])
        take = np.zeros(n, dtype=np.int64)
        missing = np.ones(n, dtype=bool)
        take[rows[lo:hi] - start] = np.arange(lo, hi)
        missing[rows[lo:hi] - start] = False
        given = (
            reasons.take(pa.array(take, mask=missing)) if len(reasons) else pa.nulls(n, pa.string())
        )
        table = ensure_drop_column(table)
        table = table.set_column(
            table.schema.get_field_index(DROP_COLUMN),
            DROP_COLUMN,
            pc.coalesce(table.column(DROP_COLUMN), given),
        )
        start += n
        kept = out.add(table, n)
        if kept.num_rows:
            out.summaries.append(stage.summarize(kept, cfg, ctx))
    return _finish(job, "join", index, out.close())


def _image_bytes(table: pa.Table) -> int:
    """About how many image bytes the rows of `table` reference (the blob files' mean)."""
    if IMAGE_FILE not in table.column_names:
        return 0
    counts = pc.value_counts(table.column(IMAGE_FILE).combine_chunks().drop_null())
    total = 0
    for c in counts.to_pylist():
        rows, size = blob_stats(c["values"])
        total += int(c["counts"] * size / max(rows, 1))
    return total


def _task_sample(job: _Job, index: int, item: dict[str, Any]) -> dict[str, Any]:
    """Shard step, phase 1: the task's rows, bytes (images included) and evenly spaced
    samples of its uids."""
    uids: list[str] = []
    nbytes = 0
    for s in item["slices"]:
        meta = storage.parquet_metadata(s["path"])
        stop = meta.num_row_groups if s["stop"] is None else s["stop"]
        nbytes += sum(meta.row_group(g).total_byte_size for g in range(s["first"], stop))
    slices = [_Slice(**s) for s in item["slices"]]
    names = storage.parquet_metadata(slices[0].path).schema.to_arrow_schema().names
    columns = ["uid", *([IMAGE_FILE] if IMAGE_FILE in names else [])]
    for t in _iter_slices(slices, 65536, columns=columns):
        uids += t.column("uid").to_pylist()
        nbytes += _image_bytes(t)
    uids.sort()
    k = min(len(uids), 256)
    picks = [uids[(i * len(uids)) // k] for i in range(k)] if k else []
    return _finish(job, "sample", index, {"rows": len(uids), "bytes": nbytes, "samples": picks})


def _task_scatter(job: _Job, index: int, item: dict[str, Any]) -> dict[str, Any]:
    """Shard step, phase 2: rows into uid ranges (`_shuffle/r*/from-{task}.parquet`)."""
    splitters = np.asarray(item["splitters"], dtype=object)
    writers: dict[int, _Parquet] = {}
    counts: dict[int, int] = {}
    for batch in _iter_slices([_Slice(**s) for s in item["slices"]], job.batch_rows):
        table = load_images(batch)
        uids = np.asarray(table.column("uid").to_pylist(), dtype=object)
        ranges = (
            np.searchsorted(splitters, uids, side="right")
            if splitters.size
            else np.zeros(len(uids), np.int64)
        )
        for r in np.unique(ranges):
            url = f"{job.step_dir}/_shuffle/r{int(r):04d}/from-{index:05d}.parquet"
            part = table.filter(pa.array(ranges == r))
            writers.setdefault(int(r), _Parquet(url)).write(part)
            counts[int(r)] = counts.get(int(r), 0) + part.num_rows
    for w in writers.values():
        w.close()
    return _finish(
        job, "scatter", index, {"counts": {str(k): v for k, v in sorted(counts.items())}}
    )


def _task_write(job: _Job, index: int, item: dict[str, Any]) -> dict[str, Any]:
    """Shard step, phase 3: sort one uid range (its scattered files, or with one range the
    upstream slices themselves) and write the shards it holds; the first and last shard may
    straddle a neighbouring range and go to fragments instead."""
    files: list[str] = item["files"]
    offset: int = item["offset"]
    per: int = item["samples_per_shard"]
    dataset = item["dataset_dir"]
    fs, root = storage.fs_path(dataset)
    fs.makedirs(f"{root}/{SHARD_DIR}", exist_ok=True)
    if item.get("slices"):
        pieces = [
            load_images(t) for t in _iter_slices([_Slice(**s) for s in item["slices"]], 65536)
        ]
    else:
        pieces = [_read_table(u) for u in files]
    table = pa.concat_tables(pieces, promote_options="permissive") if pieces else None
    shards: list[dict[str, Any]] = []
    fragments: list[dict[str, Any]] = []
    if table is None or table.num_rows == 0:
        return _finish(job, "write", index, {"shards": shards, "fragments": fragments})
    # sorted by index: the rows (image bytes included) are never copied into sorted order
    order = pc.sort_indices(table, sort_keys=[("uid", "ascending")]).to_numpy()
    check_uids(table.column("uid").take(pa.array(order)).combine_chunks())
    n = table.num_rows
    total: int = item["total"]
    pieces_todo: list[tuple[int, int, int, int]] = []  # (shard, first row, rows, within)
    pos = 0
    while pos < n:
        g = offset + pos
        k, within = divmod(g, per)
        take = min(min((k + 1) * per, total) - g, n - pos)
        pieces_todo.append((k, pos, take, within))
        pos += take

    def write_piece(k: int, pos: int, take: int, within: int) -> dict[str, Any]:
        blocks: list[np.ndarray] = []
        for start in range(pos, pos + take, ENCODE_ROWS):
            rows = order[start : min(start + ENCODE_ROWS, pos + take)]
            blocks += encode_samples(table, rows)[0]
        if within == 0 and offset + pos + take == min((k + 1) * per, total):  # whole shard
            shard = ShardFile(fs, root, k)
            shard.add(blocks, take)
            return {"shard": shard.close().model_dump()}
        url = f"{job.step_dir}/_frags/{k:06d}-{index:04d}.bin"
        storage.atomic_write(url, b"".join(bytes(b) for b in blocks))
        return {"fragment": {"shard": k, "url": url, "samples": take, "first": within}}

    # several at a time when the executor has idle CPUs (a small dataset is one range): the
    # file writes, hashing and image copies release the GIL
    with ThreadPoolExecutor(max_workers=item.get("threads", 1)) as threads:
        done = list(threads.map(lambda p: write_piece(*p), pieces_todo))
    shards = [d["shard"] for d in done if "shard" in d]
    fragments = [d["fragment"] for d in done if "fragment" in d]
    return _finish(job, "write", index, {"shards": shards, "fragments": fragments})


def _task_assemble(job: _Job, index: int, item: dict[str, Any]) -> dict[str, Any]:
    """Shard step, phase 4: a shard that straddles ranges, from its fragments in order."""
    fs, root = storage.fs_path(item["dataset_dir"])
    shard = ShardFile(fs, root, item["shard"])
    for frag in item["fragments"]:
        with fsspec.open(frag["url"], "rb") as f:
            shard.add(f.read(), frag["samples"])
    return _finish(job, "assemble", index, {"shard": shard.close().model_dump()})


_TASKS: dict[str, Callable[[_Job, int, dict[str, Any]], dict[str, Any]]] = {
    "read": _task_read,
    "apply": _task_map,
    "fit": _task_fit,
    "merge": _task_merge,
    "partition": _task_partition,
    "group": _task_group,
    "join": _task_join,
    "sample": _task_sample,
    "scatter": _task_scatter,
    "write": _task_write,
    "assemble": _task_assemble,
}


def _run_one(phase: str, job: _Job, index: int, item: dict[str, Any]) -> dict[str, Any]:
    return _TASKS[phase](job, index, item)


# --------------------------------------------------------------------------- driver side


@contextlib.contextmanager
def _run_logging() -> Iterator[None]:
    """kiln's step lines on stderr (`[kiln] ...`) when the application configured no logging."""
    handler: logging.Handler | None = None
    own_level = logger.level
    if not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[kiln] %(message)s"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(own_level)


def _sum_stats(results: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"rows_in": 0, "rows_out": 0, "dropped": {}}
    for r in results:
        total["rows_in"] += r["rows_in"]
        total["rows_out"] += r["rows_out"]
        for k, v in r["dropped"].items():
            total["dropped"][k] = total["dropped"].get(k, 0) + v
    total["dropped"] = dict(sorted(total["dropped"].items()))
    return total


class _Runner:
    """Holds the run's paths and config; runs the read step, the plan's steps, the shards."""

    def __init__(
        self,
        cfg: CurationConfig,
        run_dir: str,
        name: str,
        recipe: dict[str, Any],
        executor: Executor,
    ):
        self.cfg = cfg
        self.exe: ExecutionConfig = cfg.execution
        self.run_dir = absolute_url(run_dir).rstrip("/")
        self.name = name
        self.recipe = recipe
        self.steps: dict[str, StepStats] = {}
        self.upstream = ""
        self.files: list[str] = []
        self.executor: Executor = executor
        self.checks: dict[str, dict[str, Any]] = {}  # each step's `check`, run once

    def step_dir(self, name: str) -> str:
        return f"{self.run_dir}/steps/{name}"

    def rejects_dir(self, name: str) -> str | None:
        return f"{self.run_dir}/rejects/{name}" if self.cfg.write_rejects else None

    @property
    def dataset_dir(self) -> str:
        return absolute_url(self.cfg.shard.output or f"{self.run_dir}/dataset").rstrip("/")

    def parts(self, name: str) -> list[str]:
        return storage.list_files(self.step_dir(name), prefix="part-", suffix=".parquet")

    def slices(self, name: str) -> list[dict[str, Any]]:
        return [
            {"slices": [s.__dict__ for s in chunk]}
            for chunk in _chunk(self.parts(name), self.exe.rows_per_task)
        ]

    # ---- the step driver

    def step(
        self,
        name: str,
        stage: str,
        config: dict[str, Any],
        check: dict[str, Any],
        body: Callable[[_Job], tuple[dict[str, Any], int, int]],
        *,
        layout: dict[str, Any],
        valid: Callable[[], bool] = lambda: True,
        batch_rows: int | None = None,
    ) -> StepStats:
        """Reuse the step when its `_SUCCESS` has this fingerprint, else run `body` (which
        skips the tasks already done for this fingerprint and layout)."""
        fingerprint = json_sha256(
            {
                "runner": RUNNER_VERSION,
                "step": name,
                "stage": stage,
                "config": config,
                "check": check,
                "upstream": self.upstream,
            }
        )
        self.upstream = fingerprint
        step_dir = self.step_dir(name)
        marker = storage.read_json(f"{step_dir}/{SUCCESS_MARKER}")
        finished = isinstance(marker, dict) and marker.get("fingerprint") == fingerprint
        if finished and valid():
            stats = StepStats.model_validate(marker["stats"])
            stats.reused = True
            self.steps[name] = stats
            logger.info("step %s: reused (%d rows)", name, stats.rows_out)
            return stats
        started = storage.read_json(f"{step_dir}/{_STEP_MARKER}")
        resume = (
            not finished  # finished but no longer valid (e.g. the dataset was deleted): redo
            and isinstance(started, dict)
            and started.get("fingerprint") == fingerprint
            and started.get("layout") == layout
        )
        if not resume:
            storage.remove(step_dir)
            rejects = self.rejects_dir(name)
            if rejects:
                storage.remove(rejects)
            storage.write_json(
                f"{step_dir}/{_STEP_MARKER}", {"fingerprint": fingerprint, "layout": layout}
            )
        else:
            storage.remove(f"{step_dir}/{SUCCESS_MARKER}")
        job = _Job(
            step=name,
            step_dir=step_dir,
            rejects_dir=self.rejects_dir(name),
            fingerprint=fingerprint,
            stage=stage if stage not in ("read", "shard") else "",
            config=config,
            batch_rows=min(self.exe.batch_size, batch_rows or self.exe.batch_size),
            buckets=self.exe.key_buckets,
            plugins=tuple(self.cfg.plugins),
        )
        start = time.perf_counter()
        logger.info(
            "step %s: running%s", name, " (resuming its unfinished tasks)" if resume else ""
        )
        raw, tasks, reused = body(job)
        stats = StepStats(
            name=name,
            stage=stage,
            rows_in=raw["rows_in"],
            rows_out=raw["rows_out"],
            dropped=raw["dropped"],
            seconds=round(time.perf_counter() - start, 3),
            tasks=tasks,
            tasks_reused=reused,
            fingerprint=fingerprint,
            extra=raw.get("extra", {}),
        )
        storage.remove(f"{step_dir}/_shuffle")
        storage.remove(f"{step_dir}/_decisions")
        storage.write_json(
            f"{step_dir}/{SUCCESS_MARKER}",
            {"fingerprint": fingerprint, "stats": stats.model_dump(mode="json"), "config": config},
        )
        self.steps[name] = stats
        dropped = ", ".join(f"{k}={v}" for k, v in stats.dropped.items()) or "none"
        logger.info(
            "step %s: %d -> %d rows in %.1fs, %d tasks%s (dropped: %s)",
            name,
            stats.rows_in,
            stats.rows_out,
            stats.seconds,
            tasks,
            f", {reused} reused" if reused else "",
            dropped,
        )
        return stats

    # ---- read

    def read_items(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        parquet = self.cfg.input.format in ("parquet", "synthetic")
        for path in self.files:
            if not parquet:
                items.append({"path": path})
                continue
            for chunk in _chunk([path], self.exe.rows_per_task):
                s = chunk[0]
                items.append({"path": path, "row_groups": [s.first, s.stop]})
        return items

    def run_read(self) -> StepStats:
        input_cfg = effective_input(self.cfg.input)
        items = self.read_items()

        def body(job: _Job) -> tuple[dict[str, Any], int, int]:
            results, reused = self.executor.run("read", job, items, label="read")
            if input_cfg.limit is not None:
                results = self.apply_limit(job, items, results, input_cfg.limit)
            return _sum_stats(results), len(items), reused

        return self.step(
            "read",
            "read",
            input_cfg.model_dump(mode="json"),
            read_fingerprint(input_cfg, self.files, progress=_fingerprint_progress),
            body,
            layout={"rows_per_task": self.exe.rows_per_task},
        )

    def apply_limit(
        self, job: _Job, items: list[dict[str, Any]], results: list[dict[str, Any]], limit: int
    ) -> list[dict[str, Any]]:
        """Keep the first `limit` rows read, in input order (rows the reader dropped count
        too): the task that crosses the limit is read again up to it (in the driver: a
        handful of rows), the tasks after it are emptied. Idempotent: the cut task's marker
        holds its cut result, so a rerun finds nothing left to cut."""
        seen = 0
        out = []
        for i, r in enumerate(results):
            keep = max(0, min(r["rows_in"], limit - seen))
            if keep == 0 and r["rows_in"]:
                for url in (job.part(i), job.blobs(i), job.rejects(i)):
                    if url:
                        storage.remove(url)
                r = {"rows_in": 0, "rows_out": 0, "dropped": {}}
            elif keep < r["rows_in"]:
                r = _task_read(job, i, {**items[i], "max_rows": keep})
            seen += keep
            out.append(r)
        return out

    # ---- the plan's stages

    def run_stage(self, step: PlanStep, upstream: str) -> StepStats:
        stage = step.stage
        cfg = step.config
        res = step.resources
        check = self.checks[step.name]
        layout = {"rows_per_task": self.exe.rows_per_task, "buckets": self.exe.key_buckets}

        def body(job: _Job) -> tuple[dict[str, Any], int, int]:
            items = self.slices(upstream)
            summaries_state: pa.Table | None = None
            if stage.kind == "fit_apply" or (isinstance(stage, KeyedStage) and stage.fits):
                fits, _ = self.executor.run("fit", job, items, label="fit", resources=res)
                state_url = f"{job.step_dir}/state.parquet"
                partials = [f["partial"] for f in fits if f["partial"]]
                self.executor.run(
                    "merge",
                    job,
                    [{"partials": partials, "state_url": state_url}],
                    label="merge",
                )
                job = _Job(**{**job.__dict__, "state_url": state_url})
                summaries_state = _read_table(state_url)
            if stage.kind == "keyed":
                assert isinstance(stage, KeyedStage)
                _p, reused_p = self.executor.run(
                    "partition", job, items, label="partition keys", resources=res
                )
                groups = [
                    {
                        "files": storage.list_files(
                            f"{job.step_dir}/_shuffle/b{b:04d}", suffix=".parquet"
                        )
                    }
                    for b in range(self.exe.key_buckets)
                ]
                _g, reused_g = self.executor.run("group", job, groups, label="group", resources=res)
                joins = [
                    {
                        **it,
                        "decisions": storage.list_files(
                            f"{job.step_dir}/_decisions/p{i:05d}", suffix=".parquet"
                        ),
                    }
                    for i, it in enumerate(items)
                ]
                results, reused = self.executor.run("join", job, joins, label="join", resources=res)
                tasks = len(items) * 2 + len(groups)
                reused += reused_p + reused_g
            else:
                results, reused = self.executor.run(
                    "apply", job, items, label="apply", resources=res
                )
                tasks = len(items)
            stats = _sum_stats(results)
            summaries = [
                _read_ipc(u)
                for u in storage.list_files(f"{job.step_dir}/_summary", suffix=".arrow")
            ]
            stats["extra"] = stage.report(summaries, cfg, summaries_state)
            return stats, tasks, reused

        return self.step(
            step.name,
            stage.name,
            step.config_json(),
            check,
            body,
            layout=layout,
            batch_rows=stage.batch_rows,
        )

    # ---- shards

    def run_shard(
        self, upstream: str, manifest_stats: dict[str, Any], balance: PlanStep | None = None
    ) -> StepStats:
        """Write the shards and the manifest (with `balance`, the plan's metaclip_balance
        step, also the online-balancing sidecars, `kiln.data_curation.balance_index`)."""
        shard_cfg = self.cfg.shard
        config = {
            "shard": shard_cfg.model_dump(mode="json"),
            "dataset_dir": self.dataset_dir,
            "name": self.name,
            "recipe_sha256": json_sha256(self.recipe),
        }

        def body(job: _Job) -> tuple[dict[str, Any], int, int]:
            items = self.slices(upstream)
            samples, r1 = self.executor.run("sample", job, items, label="sample uids")
            total = sum(s["rows"] for s in samples)
            nbytes = sum(s["bytes"] for s in samples)
            ranges = max(
                1,
                math.ceil(total / self.exe.shard_rows_per_task),
                math.ceil(nbytes / self.exe.shard_bytes_per_task),
            )
            splitters = _splitters(
                [s["samples"] for s in samples], [s["rows"] for s in samples], ranges
            )
            common = {
                "total": total,
                "samples_per_shard": shard_cfg.samples_per_shard,
                "dataset_dir": self.dataset_dir,
            }
            r2 = 0
            if len(splitters) == 0:  # one range: its task reads the rows where they are
                slices = [s for it in items for s in it["slices"]]
                write_items = [{"files": [], "slices": slices, "offset": 0, **common}]
            else:
                scatter_items = [{**it, "splitters": splitters} for it in items]
                scattered, r2 = self.executor.run("scatter", job, scatter_items, label="scatter")
                counts = [0] * (len(splitters) + 1)
                for s in scattered:
                    for r, c in s["counts"].items():
                        counts[int(r)] += c
                offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
                write_items = [
                    {
                        "files": storage.list_files(
                            f"{job.step_dir}/_shuffle/r{r:04d}", suffix=".parquet"
                        ),
                        "offset": offsets[r],
                        **common,
                    }
                    for r in range(len(counts))
                ]
            # CPUs the executor would leave idle go to threads writing shards in parallel
            threads = int(self.executor.cpus // max(1, len(write_items)))
            for w in write_items:
                w["threads"] = max(1, min(_MAX_WRITE_THREADS, threads))
            written, r3 = self.executor.run("write", job, write_items, label="write shards")
            shards = [ShardInfo.model_validate(s) for w in written for s in w["shards"]]
            frags: dict[int, list[dict[str, Any]]] = {}
            for w in written:
                for f in w["fragments"]:
                    frags.setdefault(f["shard"], []).append(f)
            assemble_items = [
                {
                    "shard": k,
                    "dataset_dir": self.dataset_dir,
                    "fragments": sorted(v, key=lambda f: f["first"]),
                }
                for k, v in sorted(frags.items())
            ]
            assembled, r4 = self.executor.run("assemble", job, assemble_items, label="assemble")
            shards += [ShardInfo.model_validate(a["shard"]) for a in assembled]
            shards.sort(key=lambda s: s.path)
            sidecars = None
            if balance is not None:
                state = f"{self.step_dir(balance.name)}/state.parquet"
                sidecars = write_balance_sidecars(
                    self.dataset_dir, self.parts(upstream), state, balance.config
                )
            _write_dataset(self, shards, manifest_stats, sidecars)
            storage.remove(f"{job.step_dir}/_frags")
            stats = {
                "rows_in": total,
                "rows_out": sum(s.num_samples for s in shards),
                "dropped": {},
                "extra": {"num_shards": len(shards), "bytes": sum(s.bytes for s in shards)},
            }
            tasks = len(items) * (2 if splitters else 1) + len(write_items) + len(assemble_items)
            return stats, tasks, r1 + r2 + r3 + r4

        return self.step(
            "shard",
            "shard",
            config,
            {},
            body,
            layout={
                "rows_per_task": self.exe.rows_per_task,
                "ranges": self.exe.shard_rows_per_task,
            },
            valid=lambda: _manifest_matches(self.dataset_dir, self.recipe, balance is not None),
        )


def _splitters(samples: list[list[str]], rows: list[int], ranges: int) -> list[str]:
    """`ranges - 1` uids cutting the merged, weighted samples into ranges of about equal rows.

    Each task's samples stand for `rows / len(samples)` rows each; the result depends only on
    the tasks' inputs, so a rerun picks the same splitters.
    """
    if ranges <= 1:
        return []
    weighted: list[tuple[str, float]] = []
    for picks, n in zip(samples, rows, strict=True):
        if picks:
            weighted += [(u, n / len(picks)) for u in picks]
    weighted.sort()
    total = sum(w for _, w in weighted)
    out: list[str] = []
    acc = 0.0
    target = 1
    for uid, w in weighted:
        acc += w
        while target < ranges and acc >= total * target / ranges:
            if not out or uid > out[-1]:
                out.append(uid)
            target += 1
    return out


def _write_dataset(
    r: _Runner,
    shards: list[ShardInfo],
    stats: dict[str, Any],
    balance: BalanceSidecars | None = None,
) -> None:
    fs, root = storage.fs_path(r.dataset_dir)
    fs.makedirs(f"{root}/{SHARD_DIR}", exist_ok=True)
    remove_stale_shards(fs, root, {s.path for s in shards})
    manifest = DatasetManifest(
        name=r.name,
        num_samples=sum(s.num_samples for s in shards),
        shards=shards,
        recipe=dict(r.recipe),
        recipe_hash=json_sha256(r.recipe),
        inputs=list(r.files),
        stats={**stats, "samples_out": sum(s.num_samples for s in shards)},
        balance=balance,
    )
    write_manifest(r.dataset_dir, manifest)


def _manifest_matches(dataset_dir: str, recipe: dict[str, Any], balanced: bool = False) -> bool:
    """True when `dataset_dir` holds a readable manifest written for `recipe` (`balanced`:
    listing the online-balancing sidecars, which manifests of older kiln versions lack)."""
    if not storage.exists(f"{dataset_dir}/{MANIFEST_NAME}"):
        return False
    try:
        manifest = read_manifest(dataset_dir)
    except (ValueError, FileNotFoundError):
        return False
    return manifest.recipe_hash == json_sha256(recipe) and (
        not balanced or manifest.balance is not None
    )


def _fingerprint_progress(files: int, seconds: float) -> None:
    logger.info(
        "step read: fingerprinting input.image_dir: %d files so far (%.0fs)", files, seconds
    )


def _totals(plan: list[PlanStep], steps: dict[str, StepStats]) -> dict[str, Any]:
    dropped: dict[str, int] = {}
    for s in steps.values():
        for k, v in s.dropped.items():
            dropped[k] = dropped.get(k, 0) + v
    matched = kept = None
    deduped = 0
    for p in plan:
        s = steps[p.name]
        if p.stage.name in ("metaclip_match", "worldwide_match"):
            matched = int(s.extra.get("matched", 0))
        if p.stage.name in ("metaclip_balance", "worldwide_balance"):
            kept = s.rows_out
        if p.stage.kind == "keyed":
            deduped += sum(s.dropped.values())
    return {
        "samples_in": steps["read"].rows_in,
        "dropped_by_reason": dict(sorted(dropped.items())),
        "matched": matched,
        "kept_after_balance": kept,
        "deduped": deduped,
    }


def executor_kind(
    cfg: CurationConfig, plan: list[PlanStep] | None = None, *, address: str | None = None
) -> str:
    """`local` or `ray`: where `cfg.execution.executor` runs `cfg`'s plan when the cluster
    address is `address` (see `choose_executor`)."""
    steps = cfg.plan() if plan is None else plan
    needs_gpus = any(step.resources.num_gpus for step in steps)
    return choose_executor(cfg.execution.executor, address=address, needs_gpus=needs_gpus)


def make_executor(cfg: CurationConfig, plan: list[PlanStep]) -> Executor:
    """The executor `cfg.execution` asks for (see `executor_kind`)."""
    if executor_kind(cfg, plan) == "ray":
        return RayExecutor(_run_one)
    return LocalExecutor(_run_one, cfg.execution.workers or usable_cpus())


@dataclass
class CurationInputs:
    """What `check_curation` found: the input files, each step's `check` result, and the
    synthetic pool folder still to be generated (a dry run generates nothing)."""

    files: list[str]
    checks: dict[str, dict[str, Any]]
    pending_pool: str | None = None


def check_curation(cfg: CurationConfig, *, generate: bool = True) -> CurationInputs:
    """Everything a curation checks before any task runs: the input paths name files,
    `input.image_dir` is a folder, each stage's `check` passes (entries files exist...).

    A synthetic pool is generated first (its entries file is part of it); with `generate`
    False (`--dry-run`) a pool not generated yet is reported in `pending_pool` and the
    checks of files it will hold are skipped."""
    plan = cfg.plan()
    pool = cfg.input.paths[0] if cfg.input.format == "synthetic" else None
    if pool is not None and not generate:
        from kiln.data_curation.synthetic import pool_is_current

        if not pool_is_current(cfg.input.synthetic, pool):
            checks: dict[str, dict[str, Any]] = {}
            for step in plan:
                try:
                    checks[step.name] = step.stage.check(step.config)
                except FileNotFoundError as e:
                    if pool.rstrip("/") + "/" not in str(e):
                        raise  # not a file the pool generation writes
            return CurationInputs([], checks, pending_pool=pool)
    files = input_files(cfg.input)  # generates the synthetic pool (and its entries) if asked
    return CurationInputs(files, {step.name: step.stage.check(step.config) for step in plan})


def run_curation(
    cfg: CurationConfig,
    run_dir: str,
    *,
    name: str = "",
    recipe: dict[str, Any] | None = None,
    fresh: bool = False,
    inputs: CurationInputs | None = None,
) -> CurationResult:
    """Run (or resume) the curation plan of `cfg` in `run_dir`.

    The tasks run where `cfg.execution.executor` says: `local` (a process pool here),
    `ray` (Ray must be initialised), or `auto` (Ray if this process is connected to one or
    a stage needs GPUs, else local). Returns the `CurationResult` and writes it to
    `{run_dir}/curation_stats.json`; the dataset (shards + manifest) goes to
    `cfg.shard.output` or `{run_dir}/dataset`. `recipe` is recorded in the manifest
    (default: `cfg` itself). `fresh` redoes every step, whatever the markers say (for
    inputs whose changes the read fingerprint cannot see, `kiln.data_curation.read_fingerprint`).
    `inputs`: what `check_curation(cfg)` returned, when the caller ran it already (`kiln
    curate` does, before it starts Ray); otherwise it runs here, before any task.
    """
    start = time.perf_counter()
    recipe = recipe if recipe is not None else cfg.model_dump(mode="json")
    plan = cfg.plan()
    executor = make_executor(cfg, plan)
    # resources the executor can never give (an actor pool bigger than the cluster) would
    # hang the step: refuse them before any work
    executor.check_plan((step.name, step.resources) for step in plan)
    if inputs is None or inputs.pending_pool is not None:
        inputs = check_curation(cfg)  # fails on a missing entries file etc. before any work
    r = _Runner(cfg, run_dir, name, recipe, executor)
    r.checks = inputs.checks
    r.files = inputs.files
    if fresh:
        for folder in ("steps", "rejects"):
            storage.remove(f"{r.run_dir}/{folder}")
    try:
        return _run_plan(r, cfg, plan, start)
    finally:
        r.executor.close()


def _run_plan(
    r: _Runner, cfg: CurationConfig, plan: list[PlanStep], start: float
) -> CurationResult:
    fs, path = storage.fs_path(r.run_dir)
    fs.makedirs(path, exist_ok=True)
    with _run_logging():
        logger.info("plan: %s", " -> ".join(step_names(plan)))
        r.run_read()
        upstream = "read"
        for step in plan:
            r.run_stage(step, upstream)
            upstream = step.name
        totals = _totals(plan, r.steps)
        manifest_stats = {**totals, "samples_out": r.steps[upstream].rows_out}
        r.run_shard(upstream, manifest_stats, balance_step(plan))
    manifest: DatasetManifest = read_manifest(r.dataset_dir)
    dropped_total = sum(totals["dropped_by_reason"].values())
    if totals["samples_in"] != manifest.num_samples + dropped_total:
        raise RuntimeError(
            f"row accounting is off: {totals['samples_in']} read, {manifest.num_samples} "
            f"written, {dropped_total} dropped; rerun after deleting {r.run_dir}/steps"
        )
    result = CurationResult(
        **totals,
        samples_out=manifest.num_samples,
        num_shards=len(manifest.shards),
        dataset_dir=r.dataset_dir,
        manifest_path=f"{r.dataset_dir}/{MANIFEST_NAME}",
        steps=r.steps,
        seconds=round(time.perf_counter() - start, 3),
    )
    storage.write_json(
        f"{r.run_dir}/curation_stats.json", result.model_dump(mode="json"), sort_keys=False
    )
    return result
