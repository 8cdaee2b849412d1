"""The curation runner: read -> text -> dedup -> match -> counts -> balance -> image -> dedup -> shard.

Each step runs on Ray Data and materializes its kept rows as parquet under
`{run_dir}/steps/{NN}_{name}/`, its dropped rows (without image bytes) under
`{run_dir}/rejects/{NN}_{name}/`, and finishes by writing a `_SUCCESS` marker holding its
stats and a fingerprint: the hash of its config section and of the upstream fingerprint. A
rerun reuses every step whose marker still has the right fingerprint and recomputes from
the first step whose config (or input files) changed, so `--set balance.t=50` redoes
balance and what follows, nothing before.

Results never depend on the number of workers, blocks or retries:
- stage functions are pure per row (balancing draws from (seed, uid, entry));
- global decisions are order-free: entry counts are sums of per-block vectors, exact dedup
  keeps the row with the smallest (uid, source, source_row) per key;
- dedup needs every row of a key in one place without a Ray shuffle: the step before it
  writes its kept rows hash-partitioned by key (`execution.dedup_buckets` files per write
  task), and each dedup task reads one partition (keys first, then rows, streaming);
- written files are named by write-task index, so a retried task overwrites its own
  output; the shard step sorts by uid before writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, Field
from ray.data.datasource.datasink import Datasink, WriteResult

from kiln.contracts import (
    MANIFEST_NAME,
    DatasetManifest,
    json_sha256,
    read_manifest,
    sha256_hex,
)
from kiln.data_curation.config import CurationConfig, ExecutionConfig, ImageConfig, TextConfig
from kiln.data_curation.readers import absolute_url, input_files, read_pool
from kiln.data_curation.shard import write_shards
from kiln.data_curation.stages import DROP_COLUMN, ensure_drop_column, split_dropped

__all__ = [
    "DEDUP_KEY_COLUMN",
    "PIPELINE_VERSION",
    "STEP_NAMES",
    "SUCCESS_MARKER",
    "CurationResult",
    "StepStats",
    "run_curation",
]

logger = logging.getLogger("kiln.curation")

#: Bump when a step's output changes for the same config: invalidates every marker.
PIPELINE_VERSION = 3
SUCCESS_MARKER = "_SUCCESS"
#: Column holding the exact-dedup key between a step and the dedup step after it.
DEDUP_KEY_COLUMN = "_dedup_key"
STEP_NAMES = (
    "read",
    "text",
    "text_dedup",
    "match",
    "counts",
    "balance",
    "image",
    "image_dedup",
    "shard",
)
_REJECT_DROP = ("image",)  # columns left out of rejects tables (bulky, not needed to audit)


class StepStats(BaseModel):
    """What one step did: rows in and out, drops by reason, time, and whether it was reused."""

    name: str
    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)
    seconds: float = 0.0
    reused: bool = False
    fingerprint: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)


class CurationResult(BaseModel):
    """Summary of a curation run (also written to `{run_dir}/curation_stats.json`).

    Every input row is either in the dataset or counted once in `dropped_by_reason`:
    `samples_in == samples_out + sum(dropped_by_reason.values())`.
    """

    samples_in: int
    dropped_by_reason: dict[str, int]
    matched: int = Field(description="rows with at least one metadata entry")
    kept_after_balance: int
    deduped: int = Field(description="rows removed by exact text and image dedup")
    samples_out: int
    num_shards: int
    dataset_dir: str
    manifest_path: str
    steps: dict[str, StepStats]
    seconds: float


# --------------------------------------------------------------------------- file helpers


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def _write_json(url: str, doc: Any, *, sort_keys: bool = True) -> None:
    fs, path = _fs(url)
    tmp = path + ".tmp"
    with fs.open(tmp, "wt") as f:
        f.write(json.dumps(doc, indent=2, sort_keys=sort_keys) + "\n")
    fs.mv(tmp, path)


def _read_json(url: str) -> Any:
    fs, path = _fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rt") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError:
            return None


def _exists(url: str) -> bool:
    fs, path = _fs(url)
    return bool(fs.exists(path))


def _clear(url: str) -> None:
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _parquet_files(url: str) -> list[str]:
    fs, path = _fs(url)
    if not fs.exists(path):
        return []
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols or "local" in protocols:
        return files
    return [str(fs.unstrip_protocol(p)) for p in files]


def _bucket_of(key: str, num_buckets: int) -> int:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_buckets


def _fingerprint(name: str, config: Any, upstream: str) -> str:
    doc = {"step": name, "version": PIPELINE_VERSION, "config": config, "upstream": upstream}
    return json_sha256(doc)


# --------------------------------------------------------------------------- step sink


class _Parts:
    """Lazily opened parquet writers, one per output file, renamed into place on close."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[Any, pq.ParquetWriter, pa.Schema, str]] = {}

    def write(self, url: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if url not in self._open:
            fs, path = _fs(url)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            f = fs.open(path + ".tmp", "wb")
            self._open[url] = (f, pq.ParquetWriter(f, table.schema), table.schema, path)
        _f, writer, schema, _path = self._open[url]
        if table.schema != schema:
            table = table.cast(schema)
        writer.write_table(table)

    def close(self) -> list[str]:
        names = []
        for url, (f, writer, _schema, path) in sorted(self._open.items()):
            writer.close()
            f.close()
            fs, _ = _fs(url)
            fs.mv(path + ".tmp", path)
            names.append(url)
        self._open.clear()
        return names


def _merge_counts(into: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + int(v)


class _StepSink(Datasink[dict[str, Any]]):
    """Writes a step's output: kept rows (optionally hash-partitioned by a dedup key) and rejects.

    One write task writes `part-{task:05d}[-{bucket:03d}].parquet`; a retried task rewrites
    the same names. Each task returns its row counts, summed on the driver.
    """

    def __init__(
        self,
        data_dir: str,
        rejects_dir: str | None,
        *,
        dedup_key: str | None = None,
        num_buckets: int = 1,
    ) -> None:
        self.data_dir = data_dir.rstrip("/")
        self.rejects_dir = rejects_dir.rstrip("/") if rejects_dir else None
        self.dedup_key = dedup_key
        self.num_buckets = num_buckets
        self.stats: dict[str, Any] = {}

    def _keys(self, kept: pa.Table) -> list[str | None]:
        if self.dedup_key == "text":
            from kiln.data_curation.stages.text import text_dedup_key

            return text_dedup_key(kept).to_pylist()
        if self.dedup_key == "image":
            if "image_sha256" not in kept.column_names:
                return [None] * kept.num_rows
            return kept.column("image_sha256").to_pylist()
        raise AssertionError(self.dedup_key)

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
        parts = _Parts()
        rows_in = rows_out = matched = 0
        dropped: dict[str, int] = {}
        task = ctx.task_idx
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            if table.num_rows == 0:
                continue
            table = ensure_drop_column(table)
            rows_in += table.num_rows
            kept, rejected = split_dropped(table)
            kept = kept.drop_columns(
                [c for c in (DROP_COLUMN, DEDUP_KEY_COLUMN) if c in kept.column_names]
            )
            rows_out += kept.num_rows
            if "entry_ids" in kept.column_names:
                lengths = pc.list_value_length(kept.column("entry_ids")).fill_null(0)
                matched += int(pc.sum(pc.greater(lengths, 0)).as_py() or 0)
            for reason in rejected.column(DROP_COLUMN).to_pylist():
                dropped[reason] = dropped.get(reason, 0) + 1
            if self.rejects_dir and rejected.num_rows:
                keep_cols = [c for c in rejected.column_names if c not in _REJECT_DROP]
                parts.write(
                    f"{self.rejects_dir}/part-{task:05d}.parquet", rejected.select(keep_cols)
                )
            if self.dedup_key is None:
                parts.write(f"{self.data_dir}/part-{task:05d}.parquet", kept)
                continue
            keys = self._keys(kept)
            uids = kept.column("uid").to_pylist()
            buckets = np.array(
                [
                    _bucket_of(k if k is not None else u, self.num_buckets)
                    for k, u in zip(keys, uids, strict=True)
                ],
                dtype=np.int64,
            )
            kept = kept.append_column(DEDUP_KEY_COLUMN, pa.array(keys, pa.string()))
            for b in np.unique(buckets):
                part = kept.filter(pa.array(buckets == b))
                parts.write(f"{self.data_dir}/part-{task:05d}-{int(b):03d}.parquet", part)
        parts.close()
        return {"rows_in": rows_in, "rows_out": rows_out, "dropped": dropped, "matched": matched}

    def on_write_complete(self, write_result: WriteResult[dict[str, Any]]) -> None:
        total: dict[str, Any] = {"rows_in": 0, "rows_out": 0, "dropped": {}, "matched": 0}
        for r in write_result.write_returns:
            total["rows_in"] += r["rows_in"]
            total["rows_out"] += r["rows_out"]
            total["matched"] += r["matched"]
            _merge_counts(total["dropped"], r["dropped"])
        total["dropped"] = dict(sorted(total["dropped"].items()))
        self.stats = total


# --------------------------------------------------------------------------- batch UDFs


def _text_batch(batch: pa.Table, cfg: TextConfig) -> pa.Table:
    from kiln.data_curation.stages.text import apply_text_filters

    return apply_text_filters(batch, cfg)


class _MatchBatch:
    """Actor UDF: builds the Aho-Corasick matcher once per actor, then matches batches."""

    def __init__(self, entries: list[str]) -> None:
        from kiln.data_curation.stages.metaclip import EntryMatcher

        self.matcher = EntryMatcher(entries)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from kiln.data_curation.stages.metaclip import match_table

        return match_table(batch, self.matcher)


def _count_batch(batch: pa.Table, num_entries: int) -> pa.Table:
    from kiln.data_curation.stages.metaclip import count_entries

    counts = count_entries(batch, num_entries)
    return pa.table({"counts": pa.array([counts.tolist()], pa.list_(pa.int64()))})


def _balance_batch(batch: pa.Table, counts: np.ndarray, t: int, seed: int) -> pa.Table:
    from kiln.data_curation.stages.metaclip import balance_table

    return balance_table(batch, counts, t, seed)


def _image_batch(batch: pa.Table, cfg: ImageConfig) -> pa.Table:
    from kiln.data_curation.stages.image import apply_image_checks

    return apply_image_checks(batch, cfg)


def _read_columns(path: str, columns: list[str]) -> pa.Table:
    with fsspec.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def _read_parts(batch: pa.Table, batch_rows: int) -> Iterator[pa.Table]:
    """Ray Data UDF: stream the parquet files named in `batch["path"]`."""
    for path in batch.column("path").to_pylist():
        with fsspec.open(path, "rb") as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                yield pa.Table.from_batches([rb])


_ORDER_COLUMNS = ["uid", "source", "source_row"]


def _dedup_bucket(batch: pa.Table, reason: str, batch_rows: int) -> Iterator[pa.Table]:
    """Ray Data UDF: exact dedup of the partition files named in `batch["files"]`.

    Pass 1 reads only the key and order columns and picks, per key, the row with the
    smallest (uid, source, source_row); pass 2 streams the rows and marks the others.
    """
    from kiln.data_curation.stages import mark_dropped

    for files in batch.column("files").to_pylist():
        index = pa.concat_tables(
            [_read_columns(f, [DEDUP_KEY_COLUMN, *_ORDER_COLUMNS]) for f in files]
        )
        index = index.filter(pc.is_valid(index.column(DEDUP_KEY_COLUMN)))
        index = index.sort_by(
            [(DEDUP_KEY_COLUMN, "ascending")] + [(c, "ascending") for c in _ORDER_COLUMNS]
        )
        keys = index.column(DEDUP_KEY_COLUMN).to_pylist()
        sources = index.column("source").to_pylist()
        rows = index.column("source_row").to_pylist()
        losers = {(sources[i], rows[i]) for i in range(1, len(keys)) if keys[i] == keys[i - 1]}
        for f in files:
            with fsspec.open(f, "rb") as fh:
                for rb in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows):
                    table = pa.Table.from_batches([rb]).drop_columns([DEDUP_KEY_COLUMN])
                    if losers:
                        mask = np.array(
                            [
                                (s, r) in losers
                                for s, r in zip(
                                    table.column("source").to_pylist(),
                                    table.column("source_row").to_pylist(),
                                    strict=True,
                                )
                            ],
                            dtype=bool,
                        )
                        table = mark_dropped(table, mask, reason)
                    yield table


# --------------------------------------------------------------------------- the runner


@contextlib.contextmanager
def _run_logging() -> Iterator[None]:
    """Per-step progress lines on stderr, Ray Data's per-dataset INFO lines out of the way.

    Ray Data's progress bars stay. The step lines go to the `kiln.curation` logger; when the
    application configured no logging at all, a stderr handler is attached for the run.
    """
    ray_logger = logging.getLogger("ray.data")
    level = ray_logger.level
    ray_logger.setLevel(max(level, logging.WARNING))
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
        ray_logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(own_level)


class _Runner:
    """Holds the run's paths and config; one method per step, each returning its stats."""

    def __init__(self, cfg: CurationConfig, run_dir: str, name: str, recipe: dict[str, Any]):
        self.cfg = cfg
        self.exe: ExecutionConfig = cfg.execution
        self.run_dir = absolute_url(run_dir).rstrip("/")
        self.name = name
        self.recipe = recipe
        self.steps: dict[str, StepStats] = {}
        self.data_dirs: dict[str, str] = {}
        self.upstream = ""
        self.files: list[str] = []

    # ---- paths

    def step_dir(self, index: int, name: str) -> str:
        return f"{self.run_dir}/steps/{index:02d}_{name}"

    def rejects_dir(self, index: int, name: str) -> str | None:
        if not self.cfg.write_rejects:
            return None
        return f"{self.run_dir}/rejects/{index:02d}_{name}"

    @property
    def dataset_dir(self) -> str:
        return absolute_url(self.cfg.shard.output or f"{self.run_dir}/dataset").rstrip("/")

    # ---- datasets

    def read_step_output(self, name: str) -> Any:
        """A step's materialized rows as a Dataset: its parquet parts, read by our own tasks.

        `execution.num_blocks` read tasks (default: one per file) each stream their files.
        """
        import ray.data

        files = _parquet_files(self.data_dirs[name])
        if not files:
            return ray.data.from_items([])
        blocks = min(len(files), self.exe.num_blocks or len(files))
        ds: Any = ray.data.from_items([{"path": f} for f in files], override_num_blocks=blocks)
        return ds.map_batches(
            _read_parts,
            batch_size=None,
            batch_format="pyarrow",
            fn_kwargs={"batch_rows": self.exe.batch_size},
        )

    def sink_dataset(
        self,
        ds: Any,
        index: int,
        name: str,
        *,
        dedup_key: str | None = None,
    ) -> dict[str, Any]:
        sink = _StepSink(
            self.step_dir(index, name),
            self.rejects_dir(index, name),
            dedup_key=dedup_key,
            num_buckets=self.exe.dedup_buckets,
        )
        ds.write_datasink(sink)
        if not sink.stats:  # no write task ran: the input was empty
            sink.stats = {"rows_in": 0, "rows_out": 0, "dropped": {}, "matched": 0}
        return sink.stats

    def map(self, ds: Any, fn: Callable[..., Any], **kwargs: Any) -> Any:
        return ds.map_batches(
            fn, batch_size=self.exe.batch_size, batch_format="pyarrow", fn_kwargs=kwargs
        )

    # ---- step driver

    def run_step(
        self,
        index: int,
        name: str,
        config: Any,
        body: Callable[[], dict[str, Any]],
        *,
        passthrough_of: str | None = None,
    ) -> StepStats:
        """Reuse the step if its marker matches, else clear its outputs and run `body`."""
        fingerprint = _fingerprint(name, config, self.upstream)
        self.upstream = fingerprint
        step_dir = self.step_dir(index, name)
        marker_url = f"{step_dir}/{SUCCESS_MARKER}"
        marker = _read_json(marker_url)
        if isinstance(marker, dict) and marker.get("fingerprint") == fingerprint:
            stats = StepStats.model_validate(marker["stats"])
            stats.reused = True
            self.data_dirs[name] = f"{self.run_dir}/{marker['data_dir']}"
            self.steps[name] = stats
            logger.info("step %02d_%s: reused (%d rows)", index, name, stats.rows_out)
            return stats
        _clear(step_dir)
        _clear(f"{self.run_dir}/rejects/{index:02d}_{name}")  # stale rejects of an older run
        fs, path = _fs(step_dir)
        fs.makedirs(path, exist_ok=True)
        self.data_dirs[name] = self.data_dirs[passthrough_of] if passthrough_of else step_dir
        start = time.perf_counter()
        raw = body()
        stats = StepStats(
            name=name,
            rows_in=raw.get("rows_in", 0),
            rows_out=raw.get("rows_out", 0),
            dropped=raw.get("dropped", {}),
            seconds=round(time.perf_counter() - start, 3),
            fingerprint=fingerprint,
            extra=raw.get("extra", {}),
        )
        _write_json(
            marker_url,
            {
                "fingerprint": fingerprint,
                "data_dir": self.data_dirs[name][len(self.run_dir) + 1 :],  # run-dir relative
                "stats": stats.model_dump(mode="json"),
                "config": config,
            },
        )
        self.steps[name] = stats
        dropped = ", ".join(f"{k}={v}" for k, v in stats.dropped.items()) or "none"
        logger.info(
            "step %02d_%s: %d -> %d rows in %.1fs (dropped: %s)",
            index,
            name,
            stats.rows_in,
            stats.rows_out,
            stats.seconds,
            dropped,
        )
        return stats

    def run_dedup_step(
        self, index: int, name: str, upstream: str, reason: str, *, enabled: bool
    ) -> StepStats:
        """An exact-dedup step, or (disabled) a step that passes `upstream` through."""
        if enabled:
            return self.run_step(
                index,
                name,
                {"dedup": True},
                lambda: self.step_dedup(index, name, upstream, reason),
            )
        return self.run_step(
            index,
            name,
            {"dedup": False},
            lambda: self.step_passthrough(upstream),
            passthrough_of=upstream,
        )

    # ---- steps

    def step_read(self) -> dict[str, Any]:
        ds = read_pool(self.cfg.input, files=self.files)
        stats = self.sink_dataset(ds, 0, "read")
        stats["extra"] = {"files": len(self.files)}
        return stats

    def step_text(self) -> dict[str, Any]:
        ds = self.map(self.read_step_output("read"), _text_batch, cfg=self.cfg.text)
        return self.sink_dataset(ds, 1, "text", dedup_key="text")

    def step_dedup(self, index: int, name: str, upstream: str, reason: str) -> dict[str, Any]:
        import ray.data

        buckets: dict[int, list[str]] = {}
        for f in _parquet_files(self.data_dirs[upstream]):
            bucket = int(f.rsplit("-", 1)[-1].split(".", 1)[0])
            buckets.setdefault(bucket, []).append(f)
        items = [{"files": buckets[b]} for b in sorted(buckets)]
        if not items:
            return {"rows_in": 0, "rows_out": 0, "dropped": {}}
        ds: Any = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            _dedup_bucket,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"reason": reason, "batch_rows": self.exe.batch_size},
        )
        return self.sink_dataset(ds, index, name)

    def step_passthrough(self, upstream: str) -> dict[str, Any]:
        rows = self.steps[upstream].rows_out
        return {"rows_in": rows, "rows_out": rows, "dropped": {}}

    def step_match(self, entries: list[str]) -> dict[str, Any]:
        import ray.data

        ds = self.read_step_output("text_dedup").map_batches(
            _MatchBatch,
            fn_constructor_kwargs={"entries": entries},
            batch_size=self.exe.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=self.exe.match_actors),
            num_cpus=self.exe.actor_num_cpus,
        )
        stats = self.sink_dataset(ds, 3, "match")
        stats["extra"] = {"matched": stats.pop("matched", 0), "entries": len(entries)}
        return stats

    def sum_counts(self, step: str, num_entries: int) -> np.ndarray:
        """Global entry counts of a step's rows: per-block count vectors, summed here."""
        counts = np.zeros(num_entries, dtype=np.int64)
        ds = self.map(self.read_step_output(step), _count_batch, num_entries=num_entries)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for vector in batch.column("counts").to_pylist():
                counts += np.asarray(vector, dtype=np.int64)
        return counts

    def step_counts(self, entries: list[str]) -> dict[str, Any]:
        counts = self.sum_counts("match", len(entries))
        _write_json(
            f"{self.step_dir(4, 'counts')}/counts.json",
            {"entries": entries, "counts": counts.tolist()},
        )
        rows = self.steps["match"].rows_out
        nonzero = int((counts > 0).sum())
        return {
            "rows_in": rows,
            "rows_out": rows,
            "dropped": {},
            "extra": {"entries": len(entries), "entries_matched": nonzero},
        }

    def load_counts(self) -> tuple[list[str], np.ndarray]:
        doc = _read_json(f"{self.step_dir(4, 'counts')}/counts.json")
        if not isinstance(doc, dict) or "counts" not in doc or "entries" not in doc:
            raise RuntimeError(
                f"{self.step_dir(4, 'counts')}/counts.json is missing or unreadable: delete "
                f"{self.step_dir(4, 'counts')} and rerun"
            )
        return list(doc["entries"]), np.asarray(doc["counts"], dtype=np.int64)

    def step_balance(self) -> dict[str, Any]:
        b = self.cfg.balance
        entries, before = self.load_counts()
        ds = self.map(
            self.read_step_output("counts"),
            _balance_batch,
            counts=before,
            t=b.t,
            seed=b.seed,
        )
        stats = self.sink_dataset(ds, 5, "balance")
        after = self.sum_counts("balance", len(entries))
        _write_json(
            f"{self.step_dir(5, 'balance')}/counts_after.json",
            {"entries": entries, "counts": after.tolist()},
        )
        stats["extra"] = {"entry_counts": _balance_effect(entries, before, after)}
        return stats

    def step_image(self) -> dict[str, Any]:
        ds = self.map(self.read_step_output("balance"), _image_batch, cfg=self.cfg.image)
        return self.sink_dataset(ds, 6, "image", dedup_key="image")

    def step_shard(self, stats_for_manifest: dict[str, Any]) -> dict[str, Any]:
        ds = self.read_step_output("image_dedup")
        rows = self.steps["image_dedup"].rows_out
        if rows:
            from ray.data.context import ShuffleStrategy

            # The pull-based sort shuffle starts no aggregator actors: far cheaper for the
            # modest row counts that reach this step than the default hash shuffle.
            ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
            ds.context.execution_options.preserve_order = True
            ds = ds.sort("uid")
            tables: Iterable[pa.Table] = (
                b for b in ds.iter_batches(batch_size=self.exe.batch_size, batch_format="pyarrow")
            )
        else:
            tables = []
        manifest = write_shards(
            tables,
            self.dataset_dir,
            self.cfg.shard.samples_per_shard,
            name=self.name,
            recipe=self.recipe,
            inputs=self.files,
            stats=stats_for_manifest,
        )
        return {
            "rows_in": rows,
            "rows_out": manifest.num_samples,
            "dropped": {},
            "extra": {"num_shards": len(manifest.shards)},
        }


def _balance_effect(
    entries: list[str], before: np.ndarray, after: np.ndarray, top: int = 5
) -> dict[str, Any]:
    """How balancing flattened the entry distribution: the head entries' counts before and
    after, and the largest count over the median matched entry's (the head/tail ratio)."""
    order = np.argsort(-before, kind="stable")[:top]
    matched = before > 0

    def ratio(c: np.ndarray) -> float:
        med = float(np.median(c[matched])) if matched.any() else 0.0
        return round(float(c.max()) / med, 2) if med > 0 else 0.0

    return {
        "top": [[entries[i], int(before[i]), int(after[i])] for i in order if before[i] > 0],
        "max_over_median": [ratio(before), ratio(after)],
    }


def _totals(steps: dict[str, StepStats]) -> dict[str, Any]:
    dropped: dict[str, int] = {}
    for s in steps.values():
        _merge_counts(dropped, s.dropped)
    dropped = dict(sorted(dropped.items()))
    return {
        "samples_in": steps["read"].rows_out,
        "dropped_by_reason": dropped,
        "matched": int(steps["match"].extra.get("matched", 0)),
        "kept_after_balance": steps["balance"].rows_out,
        "deduped": dropped.get("duplicate_text", 0) + dropped.get("duplicate_image", 0),
    }


def _manifest_matches(dataset_dir: str, recipe: dict[str, Any]) -> bool:
    """True when `dataset_dir` holds a readable manifest written for `recipe`."""
    if not _exists(f"{dataset_dir}/{MANIFEST_NAME}"):
        return False
    try:
        manifest = read_manifest(dataset_dir)
    except (ValueError, FileNotFoundError):
        return False
    return manifest.recipe_hash == json_sha256(recipe)


def _entries_digest(url: str) -> str:
    with fsspec.open(url, "rb") as f:
        return sha256_hex(f.read())


def _file_identity(files: list[str]) -> list[list[Any]]:
    """(path, size, mtime) per input file: a changed input invalidates the read step."""
    out: list[list[Any]] = []
    for f in files:
        fs, path = fsspec.core.url_to_fs(f)
        info = fs.info(path)
        mtime = info.get("mtime", info.get("LastModified", info.get("updated")))
        out.append([f, info.get("size"), str(mtime) if mtime is not None else None])
    return out


def run_curation(
    cfg: CurationConfig,
    run_dir: str,
    *,
    name: str = "",
    recipe: dict[str, Any] | None = None,
) -> CurationResult:
    """Run (or resume) the curation pipeline of `cfg` in `run_dir`; Ray must be initialised.

    Returns the `CurationResult` and writes it to `{run_dir}/curation_stats.json`; the
    dataset (shards + manifest) goes to `cfg.shard.output` or `{run_dir}/dataset`. `recipe`
    is recorded in the manifest (default: `cfg` itself).
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError(
            "Ray is not initialised: call kiln.platform.ray_cluster.start_ray() (or "
            "ray.init(...)) before run_curation"
        )
    from kiln.data_curation.stages.metaclip import load_entries

    start = time.perf_counter()
    recipe = recipe if recipe is not None else cfg.model_dump(mode="json")
    r = _Runner(cfg, run_dir, name, recipe)
    fs, path = _fs(r.run_dir)
    fs.makedirs(path, exist_ok=True)
    r.files = input_files(cfg.input)
    entries = load_entries(cfg.match.entries)
    text_cfg = cfg.text.model_dump(mode="json", exclude={"dedup"})
    image_cfg = cfg.image.model_dump(mode="json", exclude={"dedup"})
    input_cfg = cfg.input.model_dump(mode="json")
    with _run_logging():
        r.run_step(0, "read", {"input": input_cfg, "files": _file_identity(r.files)}, r.step_read)
        r.run_step(1, "text", text_cfg, r.step_text)
        r.run_dedup_step(2, "text_dedup", "text", "duplicate_text", enabled=cfg.text.dedup)
        r.run_step(
            3,
            "match",
            {"entries_sha256": _entries_digest(cfg.match.entries)},
            lambda: r.step_match(entries),
        )
        r.run_step(4, "counts", {}, lambda: r.step_counts(entries), passthrough_of="match")
        r.run_step(5, "balance", cfg.balance.model_dump(mode="json"), r.step_balance)
        r.run_step(6, "image", image_cfg, r.step_image)
        r.run_dedup_step(7, "image_dedup", "image", "duplicate_image", enabled=cfg.image.dedup)
        totals = _totals(r.steps)
        manifest_stats = {**totals, "samples_out": r.steps["image_dedup"].rows_out}
        shard_cfg = {
            "shard": cfg.shard.model_dump(mode="json"),
            "dataset_dir": r.dataset_dir,
            "name": name,
            "recipe_sha256": json_sha256(recipe),
        }
        if not _manifest_matches(r.dataset_dir, recipe):
            # the dataset was deleted or overwritten by another run: write it again
            _clear(f"{r.step_dir(8, 'shard')}/{SUCCESS_MARKER}")
        r.run_step(8, "shard", shard_cfg, lambda: r.step_shard(manifest_stats))
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
    _write_json(f"{r.run_dir}/curation_stats.json", result.model_dump(mode="json"), sort_keys=False)
    return result
