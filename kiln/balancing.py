"""MetaCLIP balancing arithmetic shared by curation (offline) and training (online).

One caption is kept by its entries in one Bernoulli trial per matched entry `e`, each with
probability `p[e] = min(1, t / count[e])`; it is kept when any trial succeeds (MetaCLIP's
rule). Each trial's uniform draw is a pure function of (seed, uid, entry string):

    h_uid = fnv1a64(uid) XOR mix(seed),  h_e = mix(fnv1a64(entry)),
    u = top 53 bits of mix(h_uid XOR h_e) / 2**53          (mix: splitmix64's finalizer)

The curation stage (`kiln.data_curation.stages.metaclip_balance`) draws once with the
recipe's seed; the training loader (`kiln.training.online_balance`) redraws every epoch with
`epoch_seed(seed, epoch)` in place of the seed, from the sample's stored `fnv1a64(uid)` and
entry ids (the dataset's `sample_entries` / `entry_counts` sidecars, `SAMPLE_ENTRIES_NAME`
and `ENTRY_COUNTS_NAME`). The two sides never import each other; both import this module,
so there is one hash and one keep rule.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from kiln.contracts import fnv1a64, fnv1a64_strings, mix64, mix64_np

__all__ = [
    "ENTRY_COUNTS_NAME",
    "SAMPLE_ENTRIES_NAME",
    "any_entry_kept",
    "entry_hashes",
    "epoch_seed",
    "keep_probabilities",
    "list_offsets",
    "uid_hashes",
    "uniform_draw",
    "uniform_draws",
]

#: Sidecar beside a dataset's manifest: (entry_id int32, entry string, count int64) of every
#: entry with a match in the pool, the counts balancing used (before balancing).
ENTRY_COUNTS_NAME = "entry_counts.parquet"
#: Sidecar beside a dataset's manifest: (uid_fnv uint64 = fnv1a64(uid), entry_ids
#: list<int32>) of every sample, in dataset order (shard 0's samples first, as in the tars).
SAMPLE_ENTRIES_NAME = "sample_entries.parquet"


def uniform_draw(seed: int, uid: str, entry: str) -> float:
    """Uniform [0, 1) draw that is a pure function of (seed, uid, entry string) (the scalar
    reference of `uniform_draws`; see the module docstring)."""
    h_uid = fnv1a64(uid.encode()) ^ mix64(seed)
    x = mix64(h_uid ^ mix64(fnv1a64(entry.encode())))
    return (x >> 11) / 2.0**53


def uid_hashes(uids: pa.Array | pa.ChunkedArray | list[str], seed: int) -> np.ndarray:
    """`h_uid` of each uid (uint64), vectorized."""
    return fnv1a64_strings(uids) ^ np.uint64(mix64(seed))


def entry_hashes(entries: list[str]) -> np.ndarray:
    """`h_e` of each entry string (uint64), indexed by entry id."""
    return mix64_np(fnv1a64_strings(entries))


def uniform_draws(uid_h: np.ndarray, entry_h: np.ndarray) -> np.ndarray:
    """Vectorized `uniform_draw` for pairs of precomputed hashes (float64 in [0, 1))."""
    x = mix64_np(np.bitwise_xor(uid_h, entry_h, dtype=np.uint64))
    x >>= np.uint64(11)
    out = x.astype(np.float64)
    out *= 2.0**-53
    return out


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed online balancing draws epoch `epoch` with (a 64-bit int from both; epochs
    and seeds give unrelated streams, and none equals a curation seed by construction)."""
    return fnv1a64(f"kiln-online-balance/{seed}/{epoch}".encode())


def keep_probabilities(counts: np.ndarray, t: int | None) -> np.ndarray:
    """Per-entry keep probability `min(1, t / count)` (1 for an entry with count 0; all 1
    when `t` is None: keep every matched caption)."""
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.ones_like(counts)
    if t is None:
        return probs
    positive = counts > 0
    probs[positive] = np.minimum(1.0, t / counts[positive])
    return probs


def list_offsets(column: pa.ListArray | pa.LargeListArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0 as int64, flat values as int64) of a list column of ids."""
    import pyarrow.compute as pc

    offsets = column.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)
    return offsets, flat


def any_entry_kept(
    uid_h: np.ndarray, offsets: np.ndarray, flat: np.ndarray, probs: np.ndarray, entry_h: np.ndarray
) -> np.ndarray:
    """MetaCLIP's keep rule per row: True when any of the row's entries' trials succeeds.

    `uid_h[i]` is row i's `h_uid` (seed mixed in), its entries are `flat[offsets[i] :
    offsets[i+1]]` (ids into `probs` and `entry_h`). A row without entries is not kept.
    """
    n = len(offsets) - 1
    kept = np.zeros(n, dtype=bool)
    lengths = np.diff(offsets)
    nonempty = lengths > 0
    if not flat.size:
        return kept
    draws = uniform_draws(np.repeat(uid_h, lengths), entry_h[flat])
    kept[nonempty] = np.logical_or.reduceat(draws < probs[flat], offsets[:-1][nonempty])
    return kept
