"""Online vs offline MetaCLIP balancing over epochs: distinct samples seen, entry shares.

Offline balancing (the `metaclip_balance` stage) draws one subset at curation and training
repeats it every epoch; online balancing (`data.balance: {mode: online}`) redraws it every
epoch from the matched set (`kiln.training.online_balance`). Both use the same t, counts,
keep rule and hash (`kiln.balancing`). Over `--epochs` epochs this reports, per mode: the
samples each epoch holds, the distinct samples seen so far, and each epoch's entry
distribution: the share of entry matches (in the kept samples) that falls in head entries
(pool count > t) vs tail entries (count <= t), and the largest entry count over the median.

The pool: a synthetic long-tailed one by default (`--samples` captions, `--entries` entries
used with Zipf weights, 1-3 entries a caption, like MetaCLIP's matched pools), or a curated
matched set with its sidecars (`--dataset DIR`, e.g. the quickstart's curation with
`--set stages.metaclip_balance.t=null`). Also timed: computing one epoch's keep mask (ms
per million samples). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.balancing import (
    any_entry_kept,
    entry_hashes,
    epoch_seed,
    keep_probabilities,
)
from kiln.contracts import fnv1a64_strings, mix64, read_manifest

__all__ = ["Pool", "compare", "dataset_pool", "main", "synthetic_pool"]


@dataclass
class Pool:
    """A matched pool: per sample fnv1a64(uid) and entry ids; per entry count and hash."""

    uid_fnv: np.ndarray
    offsets: np.ndarray
    flat: np.ndarray
    counts: np.ndarray
    entry_h: np.ndarray
    source: str

    def keep(self, t: int, seed: int) -> np.ndarray:
        uid_h = self.uid_fnv ^ np.uint64(mix64(seed))
        return any_entry_kept(
            uid_h, self.offsets, self.flat, keep_probabilities(self.counts, t), self.entry_h
        )


def synthetic_pool(samples: int, entries: int, seed: int = 0) -> Pool:
    """Zipf-distributed entry use, 1-3 entries a caption (a pure function of the args)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, entries + 1)
    lengths = rng.integers(1, 4, samples)
    flat = rng.choice(entries, int(lengths.sum()), p=weights / weights.sum()).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    uids = fnv1a64_strings([f"sample-{i}" for i in range(samples)])
    return Pool(
        uids,
        offsets,
        flat,
        np.bincount(flat, minlength=entries),
        entry_hashes([f"entry {i}" for i in range(entries)]),
        f"synthetic: {samples} captions, {entries} entries, Zipf weights 1/rank, 1-3 a caption",
    )


def dataset_pool(dataset: str) -> Pool:
    """The matched set of a curated dataset, from its online-balancing sidecars."""
    from kiln.training.online_balance import OnlineBalance

    manifest = read_manifest(dataset)
    ob = OnlineBalance(dataset, manifest, 1)
    if ob.curation_t is not None:
        raise SystemExit(
            f"{dataset} was balanced at curation (t={ob.curation_t}): curate the matched set "
            "(metaclip_balance t: null) to compare online with offline balancing"
        )
    return Pool(ob.uid_fnv, ob.offsets, ob.flat, ob.counts, ob.entry_h, f"dataset {dataset}")


def _distribution(pool: Pool, kept: np.ndarray, t: int) -> dict[str, Any]:
    lengths = np.diff(pool.offsets)
    flat = pool.flat[np.repeat(kept, lengths)]
    after = np.bincount(flat, minlength=len(pool.counts))
    head = pool.counts > t
    total = max(1, int(after.sum()))
    matched = after[pool.counts > 0]
    median = float(np.median(matched[matched > 0])) if (matched > 0).any() else 0.0
    return {
        "samples": int(kept.sum()),
        "head_share": round(float(after[head].sum()) / total, 4),
        "tail_share": round(float(after[~head].sum()) / total, 4),
        "max_over_median": round(float(after.max()) / median, 2) if median else 0.0,
    }


def compare(pool: Pool, *, t: int, epochs: int, seed: int = 0) -> dict[str, Any]:
    """Per-epoch figures of offline (one draw, repeated) and online (a draw per epoch)."""
    n = len(pool.offsets) - 1
    offline = pool.keep(t, seed)
    seen_on = np.zeros(n, dtype=bool)
    rows = []
    for e in range(epochs):
        online = pool.keep(t, epoch_seed(seed, e))
        seen_on |= online
        rows.append(
            {
                "epoch": e,
                "offline": {**_distribution(pool, offline, t), "distinct_seen": int(offline.sum())},
                "online": {**_distribution(pool, online, t), "distinct_seen": int(seen_on.sum())},
            }
        )
    start = time.perf_counter()
    repeats = 3
    for e in range(repeats):
        pool.keep(t, epoch_seed(seed, 100 + e))
    mask_s = (time.perf_counter() - start) / repeats
    pool_head = pool.counts > t
    lengths = np.diff(pool.offsets)
    return {
        "pool": {
            "samples": n,
            "entries_matched": int((pool.counts > 0).sum()),
            "head_entries": int(pool_head.sum()),
            "head_share": round(float(pool.counts[pool_head].sum()) / max(1, pool.counts.sum()), 4),
            "mean_entries_per_sample": round(float(lengths.mean()), 2),
        },
        "epochs": rows,
        "distinct_after_all_epochs": {
            "offline": int(offline.sum()),
            "online": int(seen_on.sum()),
            "online_over_offline": round(float(seen_on.sum()) / max(1, int(offline.sum())), 3),
        },
        "keep_mask_ms_per_million_samples": round(mask_s * 1e3 * 1e6 / max(1, n), 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="a curated matched set (default: synthetic pool)")
    parser.add_argument("--samples", type=int, default=1_000_000, help="synthetic captions")
    parser.add_argument("--entries", type=int, default=50_000, help="synthetic entries")
    parser.add_argument("--t", type=int, default=100, help="balancing threshold (both modes)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pool = (
        dataset_pool(args.dataset)
        if args.dataset
        else synthetic_pool(args.samples, args.entries, args.seed)
    )
    report = {
        "benchmark": "online_balance",
        "source": pool.source,
        "t": args.t,
        **compare(pool, t=args.t, epochs=args.epochs, seed=args.seed),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
