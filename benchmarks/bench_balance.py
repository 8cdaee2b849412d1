"""Balancing throughput: kiln's `balance_table` against a numpy MetaCLIP balancing.

MetaCLIP balances with `p[e] = min(1, t / count[e])` and keeps a caption when one of its
entries' trials succeeds (`balance_sampling`: one `random.random() < p[e]` per matched
entry). The baseline is that rule in numpy, the fastest it can be written: flattened entry
ids, one draw per (row, entry) pair, `np.logical_or.reduceat` per row. kiln's side is the
whole stage function on an Arrow table (uid hashing for the seeded draws included).

Checks: fed kiln's own draws, the baseline keeps exactly kiln's rows. Prints JSON with
rows/s of each, per core (both run on one core here), and `ratio_vs_numpy_metaclip`.
Run: python benchmarks/bench_balance.py [--rows N] [--entries N]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pyarrow as pa

from kiln.data_curation.stages import DROP_COLUMN
from kiln.data_curation.stages.metaclip_balance import (
    balance_table,
    entry_hashes,
    keep_probabilities,
    uid_hashes,
    uniform_draws,
)


def _pool(rows: int, entries: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """Rows with 1-4 entry ids from a Zipf-like distribution, and the global counts."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 5, size=rows)
    flat = np.minimum(rng.zipf(1.3, size=int(lengths.sum())) - 1, entries - 1).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    uids = pa.array([f"{x:032x}" for x in rng.integers(0, 2**63, size=rows)])
    counts = np.bincount(flat, minlength=entries).astype(np.int64)
    return pa.table({"uid": uids, "entry_ids": ids}), counts


def numpy_metaclip(
    offsets: np.ndarray, flat: np.ndarray, probs: np.ndarray, draws: np.ndarray
) -> np.ndarray:
    """MetaCLIP's rule in numpy: a row is kept when any of its (draw < p[entry]) holds."""
    hit = draws < probs[flat]
    return np.logical_or.reduceat(hit, offsets[:-1]) if flat.size else np.zeros(0, bool)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--entries", type=int, default=500_000)
    ap.add_argument("--t", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    table, counts = _pool(args.rows, args.entries)
    entries = [f"entry {i}" for i in range(args.entries)]
    entry_h = entry_hashes(entries)
    probs = keep_probabilities(counts, args.t)

    kiln_s = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = balance_table(table, probs, entry_h, seed=0)
        kiln_s.append(time.perf_counter() - start)

    column = table.column("entry_ids").combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    flat = column.values.to_numpy().astype(np.int64)
    rng = np.random.default_rng(1)
    base_s = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        draws = rng.random(flat.size)
        numpy_metaclip(offsets, flat, probs, draws)
        base_s.append(time.perf_counter() - start)

    # identical decisions when the baseline gets kiln's draws
    rows_of = np.repeat(np.arange(args.rows), np.diff(offsets))
    uid_h = uid_hashes(table.column("uid").to_pylist(), 0)
    kiln_draws = uniform_draws(uid_h[rows_of], entry_h[flat])
    base_kept = numpy_metaclip(offsets, flat, probs, kiln_draws)
    kiln_kept = np.asarray(out.column(DROP_COLUMN).is_null().to_numpy(zero_copy_only=False))
    identical = bool(np.array_equal(base_kept, kiln_kept))

    kiln_rate = args.rows / min(kiln_s)
    base_rate = args.rows / min(base_s)
    print(
        json.dumps(
            {
                "benchmark": "balance",
                "rows": args.rows,
                "entries": args.entries,
                "pairs": int(flat.size),
                "kept": int(kiln_kept.sum()),
                "kiln_rows_per_s": round(kiln_rate),
                "numpy_metaclip_rows_per_s": round(base_rate),
                "ratio_vs_numpy_metaclip": round(kiln_rate / base_rate, 3),
                "identical_kept_sets": identical,
            },
            indent=2,
        )
    )
    if not identical:
        raise SystemExit("kiln and the numpy baseline kept different rows for the same draws")


if __name__ == "__main__":
    main()
