"""DataComp-style uid index files, and the stage that applies one to a pool.

DataComp and DFN publish a subset of a pool as a `.npy` file: a sorted numpy array of
dtype `u8,u8`, one (high, low) pair of 64-bit halves per sample of its 128-bit uid (the uid
is 32 hex characters; DataComp's baselines build the pair as `(int(uid[:16], 16),
int(uid[16:32], 16))`). kiln's own uids (`make_uid`) are 32 hex characters too; any other
uid string is mapped to the first 128 bits of its sha256, so every pool can be exported.

- `uid_pairs` / `write_uid_index` / `read_uid_index`: the format (sorted, unique);
- `uid_index` stage (map): keep only the rows whose uid is in an index file (apply a DFN or
  DataComp subset to a pool read with `input.uid_column: uid`), or drop them (`keep: false`).
  The `clip_score` stage writes the uids it keeps in the same format (`uids_out`).
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from kiln import storage
from kiln.contracts import RecipePath, StrictModel, require_file
from kiln.data_curation.stage import MapStage, register
from kiln.data_curation.stages import alive_mask, mark_dropped

__all__ = [
    "UID_DTYPE",
    "UidIndexConfig",
    "UidIndexStage",
    "in_index",
    "read_uid_index",
    "uid_pairs",
    "write_uid_index",
]

#: numpy dtype of DataComp's uid index files: (high 64 bits, low 64 bits).
UID_DTYPE = np.dtype("u8,u8")
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")


def uid_pairs(uids: list[str | None] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The `u8,u8` pair of each uid (hex uids as DataComp reads them, others via sha256)."""
    values = uids.to_pylist() if isinstance(uids, (pa.Array, pa.ChunkedArray)) else uids
    out = np.empty(len(values), dtype=UID_DTYPE)
    for i, uid in enumerate(values):
        if uid is None:
            raise ValueError("a row has a null uid: every row needs a uid to be indexed")
        text = uid if _HEX32.match(uid) else hashlib.sha256(uid.encode()).hexdigest()[:32]
        out[i] = (int(text[:16], 16), int(text[16:32], 16))
    return out


def write_uid_index(url: str, pairs: np.ndarray) -> int:
    """Write `pairs` sorted and unique as a `.npy` file at `url` (atomically); returns the
    number of uids written."""
    unique = np.unique(np.asarray(pairs, dtype=UID_DTYPE))  # sorted
    buf = io.BytesIO()
    np.save(buf, unique)
    storage.atomic_write(url, buf.getvalue())
    return len(unique)


def read_uid_index(url: str) -> np.ndarray:
    """The sorted `u8,u8` array of a uid index file (DataComp's, DFN's or kiln's)."""
    fs, path = require_file(
        url, f"uid index file {url!r} does not exist: give a .npy file of dtype u8,u8"
    )
    with fs.open(path, "rb") as f:
        try:
            arr = np.load(io.BytesIO(f.read()), allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{url!r} is not a numpy .npy file ({e})") from None
    if arr.dtype != UID_DTYPE or arr.ndim != 1:
        raise ValueError(
            f"{url!r} holds a {arr.dtype} array of shape {arr.shape}: a uid index is a 1-d "
            "array of dtype u8,u8 (DataComp's format)"
        )
    hi, lo = arr["f0"], arr["f1"]
    ordered = (hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] >= lo[:-1]))
    if not ordered.all():
        arr = np.sort(arr)
    return arr


def in_index(pairs: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Bool mask: which of `pairs` are in the sorted `index`."""
    if not len(index):
        return np.zeros(len(pairs), dtype=bool)
    pos = np.minimum(np.searchsorted(index, pairs), len(index) - 1)
    return np.asarray(index[pos] == pairs, dtype=bool)


class UidIndexConfig(StrictModel):
    """Keep (or drop) the rows whose uid is in a DataComp-style uid index file."""

    path: RecipePath = Field(
        description="the .npy index file (dtype u8,u8, e.g. a DFN or DataComp subset)",
    )
    keep: bool = Field(
        default=True,
        description="true: keep only the indexed rows; false: drop the indexed rows",
    )


class UidIndexStage(MapStage[UidIndexConfig]):
    """Apply a uid index file to the pool."""

    name = "uid_index"
    config = UidIndexConfig
    summary = "keep (or drop) the rows whose uid is in a DataComp/DFN uid index (.npy)"
    drop_reasons: ClassVar[dict[str, str]] = {
        "not_in_uid_index": "the uid is not in the uid index file (uid_index, keep: true)",
        "in_uid_index": "the uid is in the uid index file (uid_index, keep: false)",
    }

    def check(self, cfg: UidIndexConfig) -> dict[str, Any]:
        return {"index": storage.file_identity(cfg.path), "rows": len(read_uid_index(cfg.path))}

    def setup(self, cfg: UidIndexConfig, state: pa.Table | None) -> np.ndarray:
        return read_uid_index(cfg.path)

    def apply(self, table: pa.Table, cfg: UidIndexConfig, ctx: np.ndarray) -> pa.Table:
        alive = alive_mask(table)
        hit = np.zeros(table.num_rows, dtype=bool)
        if alive.any():
            uids = table.column("uid").combine_chunks().filter(pa.array(alive))
            hit[alive] = in_index(uid_pairs(uids), ctx)
        if cfg.keep:
            return mark_dropped(table, alive & ~hit, "not_in_uid_index")
        return mark_dropped(table, alive & hit, "in_uid_index")


register(UidIndexStage())
