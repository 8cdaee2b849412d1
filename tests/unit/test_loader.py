"""The training loader: pure plan, exact resume, disjoint ranks, clear errors."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.training.data import (
    Batch,
    WebDatasetLoader,
    buffer_shuffle,
    derive_rng,
    plan_epoch,
    sample_key,
)
from tests.helpers_datasets import write_tiny_dataset

BATCH = 4
WORLD = 2
SAMPLES = 64  # shards of 13: shard and batch boundaries never align
STEPS = SAMPLES // (WORLD * BATCH)  # 8 batches per rank per epoch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_dataset(tmp_path_factory.mktemp("loader") / "ds", num_samples=SAMPLES))


def make(dataset: str, *, rank: int = 0, workers: int = 0, **kw: object) -> WebDatasetLoader:
    args: dict[str, object] = dict(
        batch_size=BATCH,
        seed=7,
        rank=rank,
        world_size=WORLD,
        num_workers=workers,
        shuffle_buffer=6,
        augment=True,
        image_size=16,
        context_length=24,
    )
    args.update(kw)
    return WebDatasetLoader(dataset, **args)  # type: ignore[arg-type]


def take(loader: WebDatasetLoader, n: int) -> list[Batch]:
    it = iter(loader)
    try:
        return list(itertools.islice(it, n))
    finally:
        it.close()  # type: ignore[attr-defined]


def same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        x.uids == y.uids and torch.equal(x.images, y.images) and torch.equal(x.tokens, y.tokens)
        for x, y in zip(a, b, strict=True)
    )


# ------------------------------------------------------------------ pure index arithmetic


def test_buffer_shuffle_is_a_seeded_permutation() -> None:
    a = buffer_shuffle(50, 8, derive_rng("t", 1))
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, buffer_shuffle(50, 8, derive_rng("t", 1)))
    assert not np.array_equal(a, buffer_shuffle(50, 8, derive_rng("t", 2)))
    assert buffer_shuffle(10, 1, derive_rng("t", 1)).tolist() == list(range(10))
    # output t is always among the first t + buffer inputs (bounded read-ahead)
    assert all(int(x) <= t + 8 for t, x in enumerate(a))


def test_plan_is_pure_and_drops_only_the_tail() -> None:
    sizes = [13, 13, 13, 13, 12]
    p = plan_epoch(sizes, seed=3, epoch=0, world_size=2, batch_size=4)
    assert p == plan_epoch(sizes, seed=3, epoch=0, world_size=2, batch_size=4)
    assert sorted(p.shard_order) == [0, 1, 2, 3, 4]
    assert p.steps_per_epoch == 8
    orders = {
        plan_epoch(sizes, seed=3, epoch=e, world_size=2, batch_size=4).shard_order for e in range(6)
    }
    assert len(orders) > 1  # epochs see the shards in different orders
    # worker slices tile each rank's range exactly, in batch units
    for workers in (1, 2, 3):
        for rank in (0, 1):
            slices = [p.worker_slice(rank, v, workers, 4) for v in range(workers)]
            assert sum(s.num_batches for s in slices) == 8
            pos = rank * 32
            for s in slices:
                assert s.start == pos
                pos += s.num_batches * 4


def test_sample_key_groups_by_basename_up_to_first_dot() -> None:
    assert sample_key("abc.jpg") == ("abc", "jpg")
    assert sample_key("abc.seg.json") == ("abc", "seg.json")
    assert sample_key("dir/x.y/abc.txt") == ("dir/x.y/abc", "txt")


# ------------------------------------------------------------------ the loader itself


def test_order_is_deterministic_and_epochs_differ(dataset: str) -> None:
    a = take(make(dataset), 2 * STEPS)
    b = take(make(dataset), 2 * STEPS)
    assert same(a, b)
    epoch0 = [u for x in a[:STEPS] for u in x.uids]
    epoch1 = [u for x in a[STEPS:] for u in x.uids]
    assert epoch0 != epoch1
    assert a[0].images.shape == (BATCH, 3, 16, 16) and a[0].images.dtype == torch.float32
    assert a[0].tokens.shape == (BATCH, 24) and a[0].tokens.dtype == torch.int64
    other_seed = take(make(dataset, seed=8), STEPS)
    assert [x.uids for x in other_seed] != [x.uids for x in a[:STEPS]]


def test_ranks_are_disjoint_equal_and_cover_the_global_batches(dataset: str) -> None:
    per_rank = []
    for rank in range(WORLD):
        loader = make(dataset, rank=rank)
        batches = take(loader, STEPS)
        assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["step_in_epoch"] == 0
        assert all(len(b.uids) == BATCH for b in batches)
        per_rank.append([u for b in batches for u in b.uids])
    sets = [set(u) for u in per_rank]
    assert all(len(s) == STEPS * BATCH for s in sets)  # no sample twice within a rank
    assert not sets[0] & sets[1]
    assert len(sets[0] | sets[1]) == STEPS * BATCH * WORLD


def test_workers_zero_and_one_give_the_same_batches(dataset: str) -> None:
    assert same(
        take(make(dataset, workers=0), STEPS + 2), take(make(dataset, workers=1), STEPS + 2)
    )


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(dataset: str, workers: int) -> None:
    total = STEPS + 4  # crosses into epoch 1
    reference = take(make(dataset, workers=workers), total)
    for cut in (3, STEPS, STEPS + 1):
        first = make(dataset, workers=workers)
        head = take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
        resumed = make(dataset, workers=workers)
        resumed.load_state_dict(state)
        tail = take(resumed, total - cut)
        assert same(head + tail, reference), f"cut={cut} workers={workers}"


def test_state_from_another_shape_is_refused(dataset: str) -> None:
    loader = make(dataset, workers=2)
    take(loader, 3)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="world_size=2"):
        make(dataset, world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers"):
        make(dataset, workers=1).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        make(dataset, workers=2, batch_size=2).load_state_dict(state)
    make(dataset, workers=2).load_state_dict(state)  # same shape is fine


def test_fast_decode_is_part_of_the_state(dataset: str) -> None:
    loader = make(dataset, fast_decode=True)
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match=r"fast_decode=True .*set data\.fast_decode"):
        make(dataset, fast_decode=False).load_state_dict(state)
    # a checkpoint written before the setting existed decoded at full size
    legacy = {k: v for k, v in state.items() if k != "fast_decode"}
    make(dataset, fast_decode=False).load_state_dict(legacy)
    with pytest.raises(ValueError, match="checkpoint has fast_decode=False"):
        make(dataset, fast_decode=True).load_state_dict(legacy)


def test_decode_modes_change_pixels_only(dataset: str) -> None:
    fast, full = take(make(dataset, fast_decode=True), 3), take(make(dataset, fast_decode=False), 3)
    for a, b in zip(fast, full, strict=True):
        assert a.uids == b.uids and torch.equal(a.tokens, b.tokens)
        assert a.images.shape == b.images.shape and a.images.dtype == b.images.dtype
        # same crops and flips; the resize kernels agree to a few levels in 255
        assert (a.images - b.images).abs().mean() < 0.05


def test_too_small_dataset_names_the_fix(dataset: str) -> None:
    with pytest.raises(ValueError, match=r"lower data\.batch_size"):
        make(dataset, batch_size=64)


def test_shard_that_disagrees_with_its_manifest_is_an_error(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "ds", num_samples=26, shard_sizes=[13, 13])
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0]["num_samples"], manifest["shards"][1]["num_samples"] = 12, 14
    (root / "manifest.json").write_text(json.dumps(manifest))
    loader = WebDatasetLoader(str(root), batch_size=13, seed=0, image_size=16, context_length=8)
    with pytest.raises(ValueError, match=r"holds 1[34] samples but the manifest says 1[24]"):
        take(loader, 2)


def test_resume_does_not_read_shards_it_has_consumed(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "ds", num_samples=SAMPLES)

    def fresh() -> WebDatasetLoader:
        return make(str(root), world_size=1, shuffle_buffer=1)  # identity order

    reference = take(fresh(), 16)
    first = fresh()
    take(first, 8)  # positions 0..31 consumed: the first two shards of epoch 0's order
    state = first.state_dict()
    plan = first.plan(0)
    for k in plan.shard_order[:2]:  # corrupt them: a resume that opened them would fail
        shard = first.manifest.shards[k]
        (root / shard.path).write_bytes(b"not a tar file" * 100)
    resumed = fresh()
    resumed.load_state_dict(state)
    assert same(take(resumed, 8), reference[8:])


def test_sample_without_caption_names_shard_and_uid(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "ds", num_samples=13, shard_sizes=[13])
    shard = root / "shards" / "000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
    dropped = next(m.name for m, _ in members if m.name.endswith(".txt"))
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name != dropped:
                tar.addfile(m, io.BytesIO(data))
    loader = WebDatasetLoader(str(root), batch_size=13, seed=0, image_size=16, context_length=8)
    uid = dropped.split(".")[0]
    with pytest.raises(ValueError, match=rf"sample '{uid}' in shard .*000000\.tar.* needs"):
        take(loader, 1)
