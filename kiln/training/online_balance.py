"""Online MetaCLIP balancing: which samples of a dataset epoch `e` holds (MetaCLIP 1.2 / 2).

Instead of one balanced subset fixed at curation, the loader redraws MetaCLIP's balancing
every epoch: sample `s` with entries `E(s)` is in epoch `e` when, for some `x` in `E(s)`,
`u(epoch_seed(seed, e), uid, x) < p[x]` with `p[x] = min(1, t / count[x])` -- the keep rule
and the hash of curation's `metaclip_balance` stage (`kiln.balancing`), with the training
recipe's `t` (`data.balance.t`, which may differ from the curation's). Over many epochs the
model sees more of the head than one offline subset holds, with the same tail share per
epoch.

What the dataset must hold: the counts and each sample's entries, in the sidecars curation
writes beside the manifest (`manifest.balance`, see `kiln.data_curation.balance_index`).
Best is the matched set (`metaclip_balance` with `t: null`), as MetaCLIP 1.2 stores it;
a set balanced offline with `t_curation >= t` works too: it holds each sample with
probability `p_cur`, so the loader keeps it with `q[x] = p[x] / p_cur[x]` per entry, which
makes `p[x]` overall for single-entry captions (for multi-entry captions it is close, not
exact: the two draws are independent). `t > t_curation` is refused: the samples balancing
dropped are not in the dataset.

The kept set is a pure function of (seed, epoch, uids, entry ids, counts, t): not of ranks,
workers or batch sizes, so the loader treats it as the epoch's list of positions
(`kiln.training.data.Segment.available`) and its position arithmetic stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kiln.balancing import (
    any_entry_kept,
    entry_hashes,
    epoch_seed,
    keep_probabilities,
    list_offsets,
)
from kiln.contracts import DatasetManifest, SidecarFile, mix64, sha256_hex

__all__ = ["OnlineBalance", "kept_positions"]

_CURATE_HINT = (
    "curate it with a metaclip_balance stage (t: null writes the matched set MetaCLIP 1.2 "
    "balances online, e.g. stages: [..., {stage: metaclip_match, entries: FILE}, "
    "{stage: metaclip_balance, t: null}, ...]), or drop data.balance"
)


def _read_sidecar(root: str, info: SidecarFile) -> pa.Table:
    url = root.rstrip("/") + "/" + info.path
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{url!r} is missing (the manifest lists it for online balancing): copy the whole "
            f"dataset folder, or re-run `kiln curate`"
        ) from e
    if sha256_hex(data) != info.sha256:
        raise ValueError(
            f"{url!r} does not match the sha256 in its manifest: the dataset changed after "
            "curation; re-run `kiln curate`"
        )
    return pq.read_table(pa.BufferReader(data))


def kept_positions(
    keep: np.ndarray,
    sizes: Sequence[int],
    shard_order: Sequence[int],
    shard_starts: Sequence[int],
) -> np.ndarray:
    """Global positions (sorted, int64) of the kept samples in an epoch whose shards are read
    in `shard_order` from `shard_starts`; `keep` is per sample in dataset order (shard 0's
    samples first, as `sizes` lists them)."""
    row0 = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))])
    parts = [
        int(g0) + np.flatnonzero(keep[row0[i] : row0[i + 1]])
        for i, g0 in zip(shard_order, shard_starts, strict=True)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


class OnlineBalance:
    """A dataset's online-balancing index: per-entry keep probabilities for `t` and each
    sample's (uid hash, entry ids), read once from the manifest's sidecars."""

    def __init__(self, root: str, manifest: DatasetManifest, t: int) -> None:
        info = manifest.balance
        if info is None:
            raise ValueError(
                f"data.balance: {{mode: online}} needs the entry counts of dataset {root!r}, "
                f"but its manifest lists none: {_CURATE_HINT}"
            )
        if info.t is not None and t > info.t:
            raise ValueError(
                f"data.balance.t={t} is larger than the t={info.t} dataset {root!r} was "
                "balanced with at curation: the captions that balancing dropped are not in the "
                f"dataset. Use data.balance.t <= {info.t}, or curate the matched set "
                "(metaclip_balance with t: null)"
            )
        counts_table = _read_sidecar(root, info.entry_counts)
        samples = _read_sidecar(root, info.sample_entries)
        if samples.num_rows != manifest.num_samples:
            raise ValueError(
                f"{info.sample_entries.path!r} of dataset {root!r} lists {samples.num_rows} "
                f"samples but the manifest has {manifest.num_samples}: re-run `kiln curate`"
            )
        ids = counts_table.column("entry_id").to_numpy().astype(np.int64)
        size = int(ids.max()) + 1 if ids.size else 0
        counts = np.zeros(size, np.int64)
        counts[ids] = counts_table.column("count").to_numpy()
        names = [""] * size
        for i, name in zip(ids.tolist(), counts_table.column("entry").to_pylist(), strict=True):
            names[i] = name
        self.t = t
        self.curation_t = info.t
        self.counts = counts
        self.entry_h = entry_hashes(names)
        probs = keep_probabilities(counts, t)
        if info.t is not None:  # already kept with p_cur: keep with p / p_cur (<= 1)
            probs = probs / keep_probabilities(counts, info.t)
        self.probs = probs
        column = samples.column("entry_ids").combine_chunks()
        self.offsets, self.flat = list_offsets(column)
        if self.flat.size and (
            self.flat.min() < 0 or self.flat.max() >= size or (counts[self.flat] == 0).any()
        ):
            raise ValueError(
                f"{info.sample_entries.path!r} of dataset {root!r} names entries that "
                f"{info.entry_counts.path!r} does not count: re-run `kiln curate`"
            )
        self.uid_fnv = samples.column("uid_fnv").to_numpy().astype(np.uint64)
        self.identity: dict[str, Any] = {
            "mode": "online",
            "t": t,
            "entry_counts_sha256": info.entry_counts.sha256,
            "sample_entries_sha256": info.sample_entries.sha256,
        }

    def keep(self, seed: int, epoch: int) -> np.ndarray:
        """Which samples (dataset order) epoch `epoch` holds: a pure function of its args."""
        uid_h = self.uid_fnv ^ np.uint64(mix64(epoch_seed(seed, epoch)))
        return any_entry_kept(uid_h, self.offsets, self.flat, self.probs, self.entry_h)

    def keep_prob(self) -> np.ndarray:
        """Each sample's chance to be in an epoch, `1 - prod(1 - p[x])` over its entries."""
        lengths = np.diff(self.offsets)
        out = np.zeros(len(lengths), np.float64)
        nonempty = lengths > 0
        if self.flat.size:
            miss = np.multiply.reduceat(1.0 - self.probs[self.flat], self.offsets[:-1][nonempty])
            out[nonempty] = 1.0 - miss
        return out
