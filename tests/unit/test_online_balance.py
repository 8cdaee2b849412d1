"""Online balancing: curation's sidecars, the per-epoch keep rule (one hash with curation),
invariance to ranks and workers, exact and elastic resume, identity, clear errors. No Ray:
datasets are curated with the local executor."""

from __future__ import annotations

import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from kiln.balancing import (
    ENTRY_COUNTS_NAME,
    SAMPLE_ENTRIES_NAME,
    any_entry_kept,
    entry_hashes,
    epoch_seed,
    keep_probabilities,
    uid_hashes,
    uniform_draw,
)
from kiln.contracts import fnv1a64, read_manifest
from kiln.data_curation.config import CurationConfig
from kiln.data_curation.matching import load_entries
from kiln.training.config import DataConfig
from kiln.training.data import WebDatasetLoader
from kiln.training.online_balance import OnlineBalance
from tests.helpers_datasets import curate_matched_dataset, write_tiny_dataset

T = 10  # the synthetic pool's head entries match ~100-190 captions: t=10 drops most of them


@pytest.fixture(scope="module")
def matched(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(curate_matched_dataset(tmp_path_factory.mktemp("matched")))


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(curate_matched_dataset(tmp_path_factory.mktemp("balanced"), t=40))


def shard_samples(dataset: str) -> list[dict[str, object]]:
    """Every sample's json member, in dataset order (manifest's shards, tar order)."""
    manifest = read_manifest(dataset)
    out = []
    for shard in manifest.shards:
        with tarfile.open(manifest.shard_url(dataset, shard)) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    f = tar.extractfile(m)
                    assert f is not None
                    out.append(json.loads(f.read()))
    return out


def loader(dataset: str, **kw: object) -> WebDatasetLoader:
    args: dict[str, object] = dict(
        batch_size=8, seed=3, shuffle_buffer=16, image_size=16, context_length=8, balance_t=T
    )
    args.update(kw)
    return WebDatasetLoader(dataset, **args)  # type: ignore[arg-type]


def epoch_uids(dataset: str, world: int, workers: int, batch: int, epochs: int) -> list[set[str]]:
    """Uids every rank reads in each of the first `epochs` epochs (each batch full)."""
    per_epoch: list[set[str]] = [set() for _ in range(epochs)]
    for rank in range(world):
        ld = loader(dataset, rank=rank, world_size=world, num_workers=workers, batch_size=batch)
        it = iter(ld)
        for e in range(epochs):
            assert ld.epoch == e
            for _ in range(ld.segment().steps):
                b = next(it)
                assert len(b.uids) == batch
                assert not per_epoch[e] & set(b.uids)  # no sample twice in an epoch
                per_epoch[e] |= set(b.uids)
        it.close()  # type: ignore[attr-defined]
    return per_epoch


# ------------------------------------------------------------------ curation's sidecars


def test_sidecars_match_the_shards(matched: str) -> None:
    manifest = read_manifest(matched)
    assert manifest.balance is not None and manifest.balance.t is None
    samples = shard_samples(matched)
    index = pq.read_table(f"{matched}/{SAMPLE_ENTRIES_NAME}")
    assert index.column("uid_fnv").to_pylist() == [fnv1a64(str(s["uid"]).encode()) for s in samples]
    assert index.column("entry_ids").to_pylist() == [s["entry_ids"] for s in samples]
    assert all(s["keep_prob"] == 1.0 for s in samples)  # t: null keeps every matched caption
    assert all(s["entry_ids"] for s in samples)  # ... and only those
    counts = pq.read_table(f"{matched}/{ENTRY_COUNTS_NAME}")
    # the pool's counts (before the image stage dropped its rows): at least the dataset's
    seen: dict[int, int] = {}
    for s in samples:
        for e in s["entry_ids"]:  # type: ignore[attr-defined]
            seen[e] = seen.get(e, 0) + 1
    pool = dict(
        zip(counts.column("entry_id").to_pylist(), counts.column("count").to_pylist(), strict=True)
    )
    assert set(seen) <= set(pool) and all(pool[e] >= n for e, n in seen.items())
    entries = load_entries(str(Path(matched).parents[1] / "pool" / "metadata.txt"))
    assert counts.column("entry").to_pylist() == [entries[i] for i in pool]


def test_legacy_balance_section_keeps_t_null() -> None:
    cfg = CurationConfig.model_validate(
        {
            "input": {"format": "parquet", "paths": ["p"]},
            "match": {"entries": "e.txt"},
            "balance": {"t": None},
        }
    )
    (spec,) = [s for s in cfg.plan_specs() if s["stage"] == "metaclip_balance"]
    assert spec["t"] is None


# ------------------------------------------------------------------ the keep rule


def test_keep_is_curations_draw_with_an_epoch_seed(matched: str) -> None:
    """Each sample's keep decision is MetaCLIP's rule on `uniform_draw(epoch_seed(seed, e),
    uid, entry)`: the one hash curation balances with (checked against the scalar)."""
    ob = OnlineBalance(matched, read_manifest(matched), T)
    samples = shard_samples(matched)
    names = pq.read_table(f"{matched}/{ENTRY_COUNTS_NAME}").to_pydict()
    entry = dict(zip(names["entry_id"], names["entry"], strict=True))
    for epoch in (0, 1):
        keep = ob.keep(3, epoch)
        scalar = [
            any(
                uniform_draw(epoch_seed(3, epoch), str(s["uid"]), entry[e]) < ob.probs[e]
                for e in s["entry_ids"]  # type: ignore[attr-defined]
            )
            for s in samples
        ]
        assert keep.tolist() == scalar
    assert np.array_equal(
        ob.keep(3, 0), OnlineBalance(matched, read_manifest(matched), T).keep(3, 0)
    )
    assert not np.array_equal(ob.keep(3, 0), ob.keep(3, 1))  # the kept set changes by epoch
    assert not np.array_equal(ob.keep(3, 0), ob.keep(4, 0))
    assert 0.4 < ob.keep(3, 0).mean() < 0.9  # t=10 drops part of the head, keeps the tail


def test_keep_rate_and_head_counts_match_metaclip() -> None:
    """On a long-tailed pool (Zipf entry use, 1-3 entries a caption): kept per epoch is the
    sum of keep_prob within 4 sigma, a head entry keeps about t captions, tail entries all."""
    rng = np.random.default_rng(0)
    n, num_entries, t = 60_000, 2_000, 50
    weights = 1.0 / np.arange(1, num_entries + 1)
    lengths = rng.integers(1, 4, n)
    flat = rng.choice(num_entries, int(lengths.sum()), p=weights / weights.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    counts = np.bincount(flat, minlength=num_entries)
    probs = keep_probabilities(counts, t)
    entry_h = entry_hashes([f"entry {i}" for i in range(num_entries)])
    p_sample = 1.0 - np.multiply.reduceat(1.0 - probs[flat], offsets[:-1])
    sigma = float(np.sqrt((p_sample * (1 - p_sample)).sum()))
    uids = [f"uid{i}" for i in range(n)]
    for epoch in range(3):
        kept = any_entry_kept(uid_hashes(uids, epoch_seed(0, epoch)), offsets, flat, probs, entry_h)
        assert abs(int(kept.sum()) - p_sample.sum()) < 4 * sigma
        top = int(np.argmax(counts))  # thousands of matches; alone in a caption: p = t/count
        alone = (lengths == 1) & (flat[offsets[:-1]] == top)
        p_top = t / counts[top]
        expected, spread = alone.sum() * p_top, np.sqrt(alone.sum() * p_top * (1 - p_top))
        assert abs(int(kept[alone].sum()) - expected) < 4 * spread
        tail = counts <= t  # p = 1: every caption with a tail entry is kept
        tail_rows = np.repeat(np.arange(n), lengths)[tail[flat]]
        assert tail_rows.size and kept[tail_rows].all()


# ------------------------------------------------------------------ through the loader


def test_kept_set_is_partition_and_worker_invariant(matched: str) -> None:
    """The same uids each epoch at 1 and 2 ranks x 1 and 2 workers (same global batch), all
    from the epoch's kept set, every batch full; epochs differ."""
    ob = OnlineBalance(matched, read_manifest(matched), T)
    uids = [str(s["uid"]) for s in shard_samples(matched)]
    runs = {
        (world, workers): epoch_uids(matched, world, workers, 16 // world, epochs=2)
        for world, workers in itertools.product((1, 2), (1, 2))
    }
    first = runs[(1, 1)]
    for got in runs.values():
        assert got == first
    for e, seen in enumerate(first):
        kept = {u for u, k in zip(uids, ob.keep(3, e), strict=True) if k}
        assert seen <= kept and len(kept) - len(seen) < 16  # only the tail is dropped
    assert first[0] != first[1]


def test_resume_mid_epoch_and_elastic(matched: str) -> None:
    fresh = loader(matched, world_size=2, num_workers=2, batch_size=4)
    steps0 = fresh.segment().steps
    whole = list(itertools.islice(iter(fresh), steps0 + 5))
    first = loader(matched, world_size=2, num_workers=2, batch_size=4)
    it = iter(first)
    head = [next(it) for _ in range(steps0 - 3)]
    state = first.state_dict()
    it.close()  # type: ignore[attr-defined]
    resumed = loader(matched, world_size=2, num_workers=2, batch_size=4)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(iter(resumed), 8))  # crosses into epoch 1
    assert [b.uids for b in head + tail] == [b.uids for b in whole]
    assert all(
        np.array_equal(a.images.numpy(), b.images.numpy())
        for a, b in zip(head + tail, whole, strict=True)
    )

    # elastic: rank 0 and 1 of a 2-rank run stop at batch 5, a 1-rank run finishes the epoch
    read: list[str] = []
    for rank in (0, 1):
        ld = loader(matched, rank=rank, world_size=2, num_workers=1, batch_size=4)
        read += [u for b in itertools.islice(iter(ld), 5) for u in b.uids]
        state = ld.state_dict()
    one = loader(matched, world_size=1, num_workers=2, batch_size=8)
    one.load_state_dict(state)
    it = iter(one)
    for _ in range(one.segment().steps):
        read += next(it).uids
    assert one.epoch == 1
    it.close()  # type: ignore[attr-defined]
    assert len(read) == len(set(read))  # no sample twice in the epoch
    kept = {
        u
        for u, k in zip(
            [str(s["uid"]) for s in shard_samples(matched)],
            OnlineBalance(matched, read_manifest(matched), T).keep(3, 0),
            strict=True,
        )
        if k
    }
    assert set(read) <= kept and len(kept) - len(read) < 8


def test_resume_with_other_balance_is_refused(matched: str) -> None:
    state = loader(matched).state_dict()
    with pytest.raises(ValueError, match=r"checkpoint has balance=.*'t': 10.*set data.balance"):
        loader(matched, balance_t=20).load_state_dict(state)
    with pytest.raises(
        ValueError, match=r"checkpoint has balance=.* but this run has balance=None"
    ):
        loader(matched, balance_t=None).load_state_dict(state)
    off = loader(matched, balance_t=None).state_dict()
    off.pop("balance")  # a state written before online balancing existed: off
    loader(matched, balance_t=None).load_state_dict(off)
    with pytest.raises(ValueError, match="checkpoint has balance=None"):
        loader(matched).load_state_dict(off)


def test_offline_balanced_dataset(balanced: str, matched: str) -> None:
    """A set balanced at t=40 balances online at t <= 40 with p / p_cur; t > 40 is refused."""
    ob = OnlineBalance(balanced, read_manifest(balanced), 20)
    assert ob.curation_t == 40 and float(ob.probs.max()) <= 1.0
    head = int(np.argmax(ob.counts))
    assert ob.probs[head] == pytest.approx(20 / 40)  # both under their counts
    assert len(read_manifest(balanced).shards) and loader(balanced, balance_t=20).steps_per_epoch
    with pytest.raises(ValueError, match=r"data.balance.t=50 is larger than the t=40"):
        loader(balanced, balance_t=50)


# ------------------------------------------------------------------ bad input


def test_errors_name_the_fix(matched: str, tmp_path: Path) -> None:
    plain = str(write_tiny_dataset(tmp_path / "plain", num_samples=16))
    with pytest.raises(ValueError, match=r"manifest lists none: curate it with a metaclip_balance"):
        loader(plain)
    with pytest.raises(
        ValueError, match=r"online balancing at t=1 keeps \d+.*raise data.balance.t"
    ):
        loader(matched, balance_t=1, batch_size=300)
    with pytest.raises(ValidationError, match=r"data\.balance\.t is not set"):
        DataConfig.model_validate({"dataset": "d", "balance": {"mode": "online"}})
    with pytest.raises(ValidationError, match="mode is off"):
        DataConfig.model_validate({"dataset": "d", "balance": {"t": 5}})
    assert DataConfig.model_validate({"dataset": "d"}).balance.mode == "off"

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in Path(matched).iterdir():
        (damaged / f.name).symlink_to(f)
    (damaged / SAMPLE_ENTRIES_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"sample_entries\.parquet' is missing"):
        loader(str(damaged))
    (damaged / SAMPLE_ENTRIES_NAME).write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="does not match the sha256 in its manifest"):
        loader(str(damaged))
