"""The online-balancing sidecars of a curated dataset: entry counts and per-sample entries.

Written beside the manifest when the plan has a `metaclip_balance` stage (listed in the
manifest's `balance`, each with its sha256), so the training loader can redraw MetaCLIP's
balancing every epoch without reading a tar (`kiln.training.online_balance`):

- `entry_counts.parquet` (`kiln.balancing.ENTRY_COUNTS_NAME`): entry_id, entry, count of
  every entry the balance stage counted (its fit state: matches over the whole pool before
  balancing, what `p = min(1, t / count)` is computed from), ids ascending;
- `sample_entries.parquet` (`SAMPLE_ENTRIES_NAME`): uid_fnv (`fnv1a64(uid)`, the uid part
  of every balancing draw) and entry_ids of every sample, in dataset order: the shards hold
  the rows sorted by uid, cut every `samples_per_shard`, so that order is the uid order.

The driver reads the two columns of the rows the shard step wrote (column projection of
the upstream parts, no image bytes): memory grows with the dataset (~40 bytes a sample).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kiln import storage
from kiln.balancing import ENTRY_COUNTS_NAME, SAMPLE_ENTRIES_NAME
from kiln.contracts import BalanceSidecars, SidecarFile, fnv1a64_strings, sha256_hex
from kiln.data_curation.matching import load_entries
from kiln.data_curation.stages.metaclip_match import ENTRY_IDS_COLUMN, entries_sha256

__all__ = ["balance_step", "write_balance_sidecars"]


def balance_step(plan: list[Any]) -> Any | None:
    """The plan's last `metaclip_balance` step (None: the dataset gets no sidecars)."""
    steps = [p for p in plan if p.stage.name == "metaclip_balance"]
    return steps[-1] if steps else None


def _write(dataset_dir: str, name: str, table: pa.Table) -> SidecarFile:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=1 << 20)
    data = sink.getvalue().to_pybytes()
    storage.atomic_write(f"{dataset_dir}/{name}", data)
    return SidecarFile(path=name, bytes=len(data), sha256=sha256_hex(data))


def write_balance_sidecars(
    dataset_dir: str, parts: list[str], state_url: str, cfg: Any
) -> BalanceSidecars | None:
    """Write both sidecars for the rows of parquet files `parts` (what the shards hold)
    given the balance step's fit state at `state_url` and its config `cfg` (t, seed,
    entries). None when the rows have no `entry_ids` (a later stage dropped the column)."""
    tables = []
    for url in parts:
        with storage.open_parquet(url) as pf:
            if ENTRY_IDS_COLUMN not in pf.schema_arrow.names:
                return None
            tables.append(pf.read(columns=["uid", ENTRY_IDS_COLUMN]))
    rows = (
        pa.concat_tables(tables)
        if tables
        else pa.table(
            {"uid": pa.array([], pa.string()), ENTRY_IDS_COLUMN: pa.array([], pa.list_(pa.int32()))}
        )
    )
    rows = rows.take(pc.sort_indices(rows, sort_keys=[("uid", "ascending")]))
    ids = rows.column(ENTRY_IDS_COLUMN).combine_chunks().cast(pa.list_(pa.int32()))
    samples = pa.table(
        {
            "uid_fnv": pa.array(fnv1a64_strings(rows.column("uid")), pa.uint64()),
            ENTRY_IDS_COLUMN: ids,
        }
    )
    with storage.open_parquet(state_url) as pf:
        state = pf.read()
    entries = load_entries(cfg.entries)
    entry_ids = state.column("entry_id").to_numpy().astype(np.int64)
    counts = pa.table(
        {
            "entry_id": pa.array(entry_ids.astype(np.int32), pa.int32()),
            "entry": pa.array([entries[i] for i in entry_ids.tolist()], pa.string()),
            "count": state.column("count").cast(pa.int64()),
        }
    )
    return BalanceSidecars(
        t=cfg.t,
        seed=cfg.seed,
        entries_sha256=entries_sha256(cfg.entries),
        entry_counts=_write(dataset_dir, ENTRY_COUNTS_NAME, counts),
        sample_entries=_write(dataset_dir, SAMPLE_ENTRIES_NAME, samples),
    )
