"""The training loader: pure plan, exact resume, disjoint ranks, clear errors."""

from __future__ import annotations

import io
import itertools
import json
import pickle
import tarfile
import threading
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.models.preprocess import normalize_pixels
from kiln.storage import sample_key
from kiln.training.data import (
    BY_VALUE_BYTES,
    Batch,
    WebDatasetLoader,
    buffer_shuffle,
    derive_rng,
    plan_epoch,
    sample_seed,
)
from kiln.training.transforms import FAST_DECODE_VERSION
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
    def equal(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return x is y is None or (x is not None and y is not None and torch.equal(x, y))

    return len(a) == len(b) and all(
        x.uids == y.uids
        and equal(x.images, y.images)
        and equal(x.tokens, y.tokens)
        and equal(x.sample_seeds, y.sample_seeds)
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
    assert a[0].images.shape == (BATCH, 3, 16, 16) and a[0].images.dtype == torch.uint8
    assert a[0].tokens.shape == (BATCH, 24) and a[0].tokens.dtype == torch.int64
    other_seed = take(make(dataset, seed=8), STEPS)
    assert [x.uids for x in other_seed] != [x.uids for x in a[:STEPS]]


def test_a_batch_is_pixels_that_its_rank_normalizes(dataset: str) -> None:
    """The loader hands over uint8 pixels (a quarter of float32's bytes); `Batch.to`
    makes the model's input on the rank's device: exactly the normalized pixels, in the
    run's image dtype, the other fields unchanged."""
    (batch,) = take(make(dataset), 1)
    assert batch.images.dtype == torch.uint8 and batch.images.is_contiguous()
    fields = ("images", "tokens")
    got = batch.to("cpu", torch.float32, fields)
    want = normalize_pixels(batch.images)
    assert got["images"].dtype == torch.float32 and torch.equal(got["images"], want)
    assert torch.equal(got["tokens"], batch.tokens)
    half = batch.to("cpu", torch.bfloat16, fields)["images"]
    assert half.dtype == torch.bfloat16 and torch.equal(half, want.to(torch.bfloat16))
    assert batch.images.dtype == torch.uint8  # the batch itself is left as it was


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


def test_batches_over_the_by_value_size_come_through_shared_memory_alike(dataset: str) -> None:
    big = {"image_size": 112}  # 4 x 3 x 112 x 112 float32: 588 KiB > BY_VALUE_BYTES
    assert BATCH * 3 * 112 * 112 * 4 > BY_VALUE_BYTES
    assert same(take(make(dataset, workers=0, **big), 3), take(make(dataset, workers=1, **big), 3))


@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (4, 3, 112, 112)])
def test_a_batch_is_handed_over_by_value_only_when_small(shape: tuple[int, ...]) -> None:
    batch = Batch(torch.rand(shape), torch.arange(8).reshape(4, 2), list("abcd"), None)
    payload = ForkingPickler.dumps(batch)  # what a DataLoader worker sends its rank
    by_value = len(payload) > batch.images.nbytes
    assert by_value == (batch.images.nbytes + batch.tokens.nbytes <= BY_VALUE_BYTES)  # type: ignore[union-attr]
    got = pickle.loads(payload)
    assert got.uids == batch.uids and got.sample_seeds is None
    assert torch.equal(got.images, batch.images) and torch.equal(got.tokens, batch.tokens)
    assert got.images.is_shared() != by_value
    got.images.add_(1)  # writable, as a shared-memory batch is


def test_sample_seeds_only_when_asked_for(dataset: str) -> None:
    with_seeds = take(make(dataset), 2)
    without = take(make(dataset, with_seeds=False), 2)
    for a, b in zip(with_seeds, without, strict=True):
        assert b.sample_seeds is None and a.sample_seeds is not None
        assert a.sample_seeds.tolist() == [sample_seed(7, 0, u) for u in a.uids]
        assert a.uids == b.uids and torch.equal(a.images, b.images)
    with pytest.raises(ValueError, match="with_seeds=False"):
        without[0].to("cpu", torch.float32, ("images", "sample_seeds"))


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


def test_one_dataloader_serves_every_epoch_with_an_odd_number_of_steps(dataset: str) -> None:
    """9 steps per epoch, 2 workers: epoch boundaries fall mid-way through DataLoader's
    round-robin. Reading three epochs through one DataLoader gives the batches of loaders
    started fresh at each epoch's first batch, or at any batch in between."""
    kw = {"world_size": 1, "batch_size": 7, "workers": 2}  # 64 // 7 = 9 steps per epoch
    steps = make(dataset, **kw).steps_per_epoch
    assert steps == 9
    reference = take(make(dataset, **kw), 3 * steps)
    for cut in (steps, 2 * steps, 4, steps + 5, 2 * steps + 1):
        first = make(dataset, **kw)
        head = take(first, cut)
        resumed = make(dataset, **kw)
        resumed.load_state_dict(first.state_dict())
        assert same(head + take(resumed, 3 * steps - cut), reference), cut


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_in_the_rank_give_the_worker_processes_batches(dataset: str, workers: int) -> None:
    """`in_rank` (the workers taking turns in the consumer's process) over three epochs of
    9 steps, whose boundaries fall mid-way through the round-robin: the batches of as many
    worker processes, and a position either one saved resumes in the other exactly."""
    kw = {"world_size": 1, "batch_size": 7, "workers": workers}
    total = 3 * make(dataset, **kw).steps_per_epoch
    reference = take(make(dataset, **kw), total)
    assert same(take(make(dataset, in_rank=True, **kw), total), reference)
    for cut, saver, resumer in ((4, False, True), (10, True, False), (19, True, True)):
        first = make(dataset, in_rank=saver, **kw)
        head = take(first, cut)
        resumed = make(dataset, in_rank=resumer, **kw)
        resumed.load_state_dict(first.state_dict())
        assert same(head + take(resumed, total - cut), reference), (cut, saver, resumer)


def test_state_from_another_run_is_refused(dataset: str) -> None:
    loader = make(dataset, workers=2)
    take(loader, 3)
    state = loader.state_dict()
    with pytest.raises(ValueError, match=r"seed=7 but this run has seed=8; set seed"):
        make(dataset, workers=2, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match=r"augment=True but this run has augment=False"):
        make(dataset, workers=2, augment=False).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        make(dataset).load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="malformed"):
        make(dataset).load_state_dict({k: v for k, v in state.items() if k != "batch_size"})
    make(dataset, workers=2).load_state_dict(state)  # same run is fine


def _uids(batches: list[Batch]) -> list[str]:
    return [u for b in batches for u in b.uids]


def _read_epoch_elastically(
    dataset: str, stints: list[tuple[dict[str, int], int | None]]
) -> tuple[list[str], int]:
    """Read epoch 0 in stints of (layout, batches per rank; None: to the epoch's end), each
    resuming from the state the previous one left; returns every uid read and the last
    stint's global batch size."""
    uids: list[str] = []
    state: dict[str, object] | None = None
    glob = 0
    for layout, steps in stints:
        world = layout["world_size"]
        loaders = [make(dataset, rank=r, **layout) for r in range(world)]  # type: ignore[arg-type]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(json.loads(json.dumps(state)))
        n = loaders[0].state_dict()["steps_per_epoch"] if steps is None else steps
        assert isinstance(n, int)
        for loader in loaders:
            uids += _uids(take(loader, n))
        states = [loader.state_dict() for loader in loaders]
        assert all(s == states[0] for s in states), "ranks disagree on the position"
        state = states[0]
        glob = world * layout.get("batch_size", BATCH)
    assert state is not None and state["epoch"] == 1 and state["step_in_epoch"] == 0
    return uids, glob


@pytest.mark.parametrize(
    "stints",
    [
        [({"world_size": 2}, 3), ({"world_size": 1}, None)],  # 2 -> 1
        [({"world_size": 1}, 5), ({"world_size": 2, "workers": 2}, None)],  # 1 -> 2
        [({"world_size": 2, "workers": 2}, 3), ({"world_size": 4}, None)],  # 2 -> 4
        [({"world_size": 2}, 3), ({"world_size": 1, "batch_size": 8}, None)],  # same global batch
        [({"world_size": 2}, 3), ({"world_size": 1}, 2), ({"world_size": 4}, None)],  # twice
    ],
)
def test_elastic_resume_reads_every_sample_of_the_epoch_once(
    dataset: str, stints: list[tuple[dict[str, int], int | None]]
) -> None:
    uids, last_global_batch = _read_epoch_elastically(dataset, stints)
    assert len(uids) == len(set(uids)), "a sample was read twice in one epoch"
    # only the last layout's tail (less than one of its global batches) is left unread
    assert SAMPLES - last_global_batch < len(uids) <= SAMPLES


def test_after_an_elastic_resume_the_next_epoch_is_the_new_layouts_own(dataset: str) -> None:
    first = make(dataset, world_size=2)
    take(first, 3)
    resumed = make(dataset, world_size=1)
    resumed.load_state_dict(first.state_dict())
    steps = resumed.state_dict()["steps_per_epoch"]
    assert steps == (SAMPLES - 2 * 3 * BATCH) // BATCH
    after = take(resumed, steps + 3)[steps:]
    fresh = make(dataset, world_size=1)
    assert same(after, take(fresh, fresh.steps_per_epoch + 3)[fresh.steps_per_epoch :])


def test_elastic_resume_is_itself_resumable_exactly(dataset: str) -> None:
    first = make(dataset, world_size=2, workers=2)
    take(first, 3)
    state = first.state_dict()
    reference = make(dataset, world_size=1, workers=2)
    reference.load_state_dict(state)
    expected = take(reference, 6)
    a = make(dataset, world_size=1, workers=2)
    a.load_state_dict(state)
    head = take(a, 2)
    b = make(dataset, world_size=1, workers=2)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert same(head + take(b, 4), expected)


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


def test_a_run_keeps_the_fast_decode_pixels_it_started_with(tmp_path: Path) -> None:
    """A checkpoint's loader state records the version of the fast-decode pixels; a
    resumed loader adopts it (a state from before versions existed: version 1), so a run
    resumed by a newer kiln sees the pixels it started with."""
    # 128 px photos at 16 px: every crop decodes at a reduced scale, where versions differ
    root = str(write_tiny_dataset(tmp_path / "ds", num_samples=16, image_size=128))
    kw = {"world_size": 1, "fast_decode": True}
    started = make(root, **kw)
    take(started, 1)
    state = started.state_dict()
    assert (state["version"], state["fast_decode_version"]) == (3, FAST_DECODE_VERSION)
    legacy = {k: v for k, v in state.items() if k != "fast_decode_version"} | {"version": 2}
    old, new = make(root, **kw), make(root, **kw)
    old.load_state_dict(legacy)
    new.load_state_dict(state)
    (a,), (b,) = take(old, 1), take(new, 1)
    assert a.uids == b.uids and not torch.equal(a.images, b.images)
    carried = json.loads(json.dumps(old.state_dict()))
    assert carried["fast_decode_version"] == 1  # into the resumed run's next checkpoint
    again = make(root, **kw)
    again.load_state_dict(carried)
    assert same(take(again, 1), take(old, 1))  # and from there on, version 1 still
    with pytest.raises(ValueError, match="fast_decode_version=9, which this kiln does not know"):
        make(root, **kw).load_state_dict({**state, "fast_decode_version": 9})


def test_decode_modes_change_pixels_only(dataset: str) -> None:
    fast, full = take(make(dataset, fast_decode=True), 3), take(make(dataset, fast_decode=False), 3)
    for a, b in zip(fast, full, strict=True):
        assert a.uids == b.uids and torch.equal(a.tokens, b.tokens)
        assert a.images.shape == b.images.shape and a.images.dtype == b.images.dtype
        # same crops and flips; the resize kernels agree to a few levels in 255
        assert (a.images.float() - b.images.float()).abs().mean() < 3.5


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


def test_a_workers_error_reaches_the_consumer_and_ends_the_hand_over(tmp_path: Path) -> None:
    """With worker processes, batches are handed over on a thread (`kiln.training.prefetch`):
    a worker's error is raised to the consumer, the thread ends and the loader can be
    iterated again."""
    root = write_tiny_dataset(tmp_path / "ds", num_samples=26, shard_sizes=[13, 13])
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0]["num_samples"], manifest["shards"][1]["num_samples"] = 12, 14
    (root / "manifest.json").write_text(json.dumps(manifest))
    loader = WebDatasetLoader(
        str(root), batch_size=13, seed=0, image_size=16, context_length=8, num_workers=1
    )
    for _ in range(2):
        with pytest.raises(ValueError, match=r"holds 1[34] samples but the manifest says 1[24]"):
            take(loader, 2)
        assert not [t for t in threading.enumerate() if t.name == "kiln-loader"]


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
