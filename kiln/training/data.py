"""Deterministic, resumable WebDataset loader for training.

The order of samples is a pure function of (seed, epoch, rank, logical worker) and of the
dataset manifest; the loader's position is two integers (epoch, batches consumed in the epoch)
plus, after an elastic resume, the layouts that read the epoch's earlier part. That is what
makes a resumed run see exactly the batches an uninterrupted run would have seen.

Plan of one epoch (all index arithmetic, no I/O):

1. The shards listed in the manifest are permuted with an rng seeded by (seed, epoch) and
   concatenated into one global sequence of N sample positions.
2. ``steps_per_epoch = N // (world_size * batch_size)``: the tail is dropped so every rank
   gets the same number of batches (unequal counts would hang a collective).
3. Rank r owns the contiguous positions ``[r*S*B, (r+1)*S*B)``.
4. The rank's batches j = 0..S-1 are split among W *logical* workers: logical worker v makes
   the batches with ``j % W == v`` from its own contiguous sub-range of the rank's positions,
   shuffled by a shuffle buffer whose rng is seeded by (seed, epoch, rank, v). The buffer
   is simulated on integer positions, so the emit order is known before any byte is read.
5. torch's DataLoader takes IterableDataset batches from its workers round-robin, in order.
   One DataLoader serves every epoch from the loader's position on (its worker processes
   start once). When an epoch starts at batch s0 (a resume) and d batches came out of the
   DataLoader before it, physical worker w plays logical worker ``(w - d + s0) % W`` in
   it and skips that worker's batches below s0; the k-th batch out of the DataLoader in
   that epoch is then batch ``s0 + k`` of the epoch. Skipped samples are never decoded and
   their bytes never read: a worker walks tar headers up to the first sample it needs.
   The consumer takes the DataLoader's batches through a thread that receives them two
   ahead (`kiln.training.prefetch`), so a batch's hand-over from its worker process
   happens while the consumer computes; the position still counts batches handed out.

``num_workers=0`` reads in-process and yields the same batches as ``num_workers=1``.
``in_rank=True`` runs the W logical workers in the rank's process too, taking turns in
DataLoader's round-robin order: the same batches as W worker processes, without the
processes and each batch's hand-over (what a rank wants when the ranks fill the node's
cores, `kiln.training.cpu_binding.loader_in_rank`).

Elastic resume. The loader state records its *layout* (world size, workers, batch size,
shuffle buffer) and the (seed, augmentation, fast decode, manifest hash) it is valid for.
Loading it into a loader with another of those is an error (the version of the fast-decode
pixels it records is adopted: a run keeps the pixels it started with); into one with another
layout it continues the epoch as a new *segment* (`Segment`): the positions the old layout
read are known exactly (steps 3-4 are pure), so the new layout splits the positions left
over, in order, among its ranks and workers as steps 2-4 split a whole epoch. Over the epoch
no sample is read twice, and only the last segment's tail (fewer than one global batch) is
dropped. The next epoch is planned from scratch with the new layout.

Online balancing (`balance_t`, `kiln.training.online_balance`). An epoch then holds only
the samples MetaCLIP's balancing draws for it, a pure function of (seed, epoch, uid,
entries, t): step 1's sequence is filtered to the kept positions, and the epoch is planned as
a segment whose `available` positions are those (steps per epoch vary a little by epoch).
Steps 2-5, resume and elastic resume work on that list as on a whole epoch; the balance
config is part of the loader's identity.

Decoding (`kiln.training.transforms.image_pixels`): each sample's image becomes ``uint8``
pixels at the model's input size (with ``fast_decode``, JPEGs are decoded at a reduced DCT
scale, so the setting is part of the loader's identity). A batch goes to its rank as those
``uint8`` pixels, a quarter of the bytes of ``float32``; `Batch.to` normalizes them on the
rank's device (`normalize_pixels`), from page-locked memory on a GPU (``pin_memory``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kiln import storage
from kiln.contracts import DatasetManifest, read_manifest
from kiln.training.config import TrainConfig
from kiln.training.cpu_binding import bind_worker
from kiln.training.online_balance import OnlineBalance, kept_positions
from kiln.training.prefetch import Prefetched
from kiln.training.transforms import FAST_DECODE_VERSION, FAST_DECODE_VERSIONS

__all__ = [
    "BY_VALUE_BYTES",
    "LOADER_STATE_VERSION",
    "Batch",
    "EpochPlan",
    "Layout",
    "Segment",
    "WebDatasetLoader",
    "WorkerSlice",
    "buffer_shuffle",
    "dataset_has_text",
    "derive_rng",
    "manifest_hash",
    "plan_epoch",
    "plan_segment",
    "sample_seed",
]

LOADER_STATE_VERSION = 3  # 3: fast_decode_version (an older kiln must not resume it)
#: Identity fields added after version 1, with the value a state without them was written with.
_STATE_DEFAULTS: dict[str, Any] = {"fast_decode": False, "balance": None}
#: The fast-decode pixels of a state written before versions were recorded.
_FIRST_FAST_DECODE_VERSION = 1
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def derive_rng(*parts: object) -> np.random.Generator:
    """A numpy Generator seeded from a tuple of values (negative seeds are fine).

    The parts are hashed, so (0, 1) and (1, 0) and ("0", 1) give unrelated streams.
    """
    key = "kiln-loader/" + "/".join(repr(p) for p in parts)
    digest = hashlib.sha256(key.encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def manifest_hash(manifest: DatasetManifest) -> str:
    """Hash of what defines the sample sequence: the shard list and their sizes/checksums."""
    shards = [[s.path, s.num_samples, s.sha256] for s in manifest.shards]
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]


def buffer_shuffle(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """Emit order of positions 0..n-1 passed through a shuffle buffer of `buffer_size`.

    Classic streaming shuffle: fill the buffer, then for each new input emit a random buffer
    slot and put the input there; drain the rest in random order. Output t is always among
    inputs 0..t+buffer_size, so a reader streaming its inputs holds at most about
    `buffer_size` samples. Pure: the result depends only on (n, buffer_size, rng state).
    """
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    size = max(1, min(buffer_size, n))
    out = np.empty(n, dtype=np.int64)
    buf = list(range(size))
    slots = rng.integers(0, size, n - size) if n > size else np.zeros(0, dtype=np.int64)
    for t, x in enumerate(range(size, n)):
        i = int(slots[t])
        out[t] = buf[i]
        buf[i] = x
    tail = np.asarray(buf, dtype=np.int64)
    rng.shuffle(tail)
    out[n - size :] = tail
    return out


@dataclass(frozen=True)
class WorkerSlice:
    """Positions [start, start+num_batches*batch_size) of the epoch's global sequence."""

    logical_worker: int
    start: int
    num_batches: int


@dataclass(frozen=True)
class EpochPlan:
    """Where every sample of one epoch goes: shard order and per-rank/worker slices."""

    epoch: int
    shard_order: tuple[int, ...]
    shard_starts: tuple[int, ...]  # global position of each shard in shard_order
    steps_per_epoch: int

    def worker_slice(
        self, rank: int, logical_worker: int, num_workers: int, batch_size: int
    ) -> WorkerSlice:
        """The contiguous sub-range logical worker `logical_worker` of `rank` reads."""
        s = self.steps_per_epoch
        counts = [len(range(v, s, num_workers)) for v in range(num_workers)]
        start = rank * s * batch_size + batch_size * sum(counts[:logical_worker])
        return WorkerSlice(logical_worker, start, counts[logical_worker])


def plan_epoch(
    shard_sizes: Sequence[int], *, seed: int, epoch: int, world_size: int, batch_size: int
) -> EpochPlan:
    """Shard order and steps per epoch; a pure function of its arguments."""
    order = derive_rng("shards", seed, epoch).permutation(len(shard_sizes))
    starts, pos = [], 0
    for i in order:
        starts.append(pos)
        pos += int(shard_sizes[i])
    steps = pos // (world_size * batch_size)
    return EpochPlan(epoch, tuple(int(i) for i in order), tuple(starts), steps)


@dataclass(frozen=True)
class Layout:
    """How a stretch of an epoch is split: ranks, logical workers per rank, micro-batch size
    per rank, shuffle-buffer size. A resume may change any of them (elastic resume)."""

    world_size: int
    num_workers: int
    batch_size: int
    shuffle_buffer: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Segment:
    """A stretch of one epoch read with one `Layout`.

    An epoch is one segment unless a resume changed the layout mid-epoch; the segment that
    starts then reads only the positions earlier segments left unread (`available`, sorted
    global positions; None: every position of the epoch), so over the epoch no sample is
    read twice. Ranks own contiguous runs of `available` and logical workers contiguous
    runs of their rank's, exactly as `EpochPlan.worker_slice` lays out a whole epoch.
    """

    epoch: int
    index: int  # 0 for the segment that starts the epoch
    layout: Layout
    total: int  # samples in the epoch
    available: np.ndarray | None
    steps: int  # batches per rank

    def worker_counts(self) -> list[int]:
        w = self.layout.num_workers
        return [len(range(v, self.steps, w)) for v in range(w)]

    def worker_positions(self, rank: int, logical_worker: int) -> np.ndarray:
        """Sorted global positions logical worker `logical_worker` of `rank` reads."""
        bsz = self.layout.batch_size
        counts = self.worker_counts()
        start = rank * self.steps * bsz + bsz * sum(counts[:logical_worker])
        stop = start + counts[logical_worker] * bsz
        if self.available is None:
            return np.arange(start, stop, dtype=np.int64)
        return self.available[start:stop]

    def emit_order(self, seed: int, rank: int, logical_worker: int, n: int) -> np.ndarray:
        """Indices into `worker_positions(rank, logical_worker)` in the order they are read."""
        parts: tuple[object, ...] = ("buffer", seed, self.epoch, rank, logical_worker)
        if self.index:
            parts += ("segment", self.index)
        return buffer_shuffle(n, self.layout.shuffle_buffer, derive_rng(*parts))

    def consumed(self, seed: int, steps_done: int) -> np.ndarray:
        """Global positions read by all ranks in this segment's first `steps_done` batches."""
        w, bsz = self.layout.num_workers, self.layout.batch_size
        out = []
        for rank in range(self.layout.world_size):
            for v in range(w):
                positions = self.worker_positions(rank, v)
                done = len(range(v, steps_done, w)) * bsz
                if done:
                    order = self.emit_order(seed, rank, v, len(positions))
                    out.append(positions[order[:done]])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def plan_segment(
    total: int,
    seed: int,
    epoch: int,
    history: Sequence[tuple[Layout, int]],
    layout: Layout,
    kept: np.ndarray | None = None,
) -> Segment:
    """The segment `layout` reads in `epoch` after the segments of `history` ((layout,
    batches read) each, in order) read their part; `kept`: the sorted positions the epoch
    holds (online balancing; None: all `total`). Pure: integers in, positions out."""
    available: np.ndarray | None = kept
    for index, (old, steps_done) in enumerate(history):
        segment = _segment(total, epoch, index, old, available)
        if not 0 <= steps_done <= segment.steps:
            raise ValueError(
                f"loader history says {steps_done} batches were read with {old}, but that "
                f"segment of epoch {epoch} has {segment.steps}"
            )
        left = np.setdiff1d(
            available if available is not None else np.arange(total, dtype=np.int64),
            segment.consumed(seed, steps_done),
            assume_unique=True,
        )
        available = left
    return _segment(total, epoch, len(history), layout, available)


def _segment(
    total: int, epoch: int, index: int, layout: Layout, available: np.ndarray | None
) -> Segment:
    n = total if available is None else len(available)
    steps = n // (layout.world_size * layout.batch_size)
    return Segment(epoch, index, layout, total, available, steps)


def dataset_has_text(dataset: str) -> bool:
    """True when the dataset's first sample has a caption (``{uid}.txt``).

    kiln's shards are uniform (every sample has the members of the first), so one sample
    tells; reading it costs one tar header walk of the first shard.
    """
    manifest = read_manifest(dataset)
    if not manifest.shards:
        return False
    url = manifest.shard_url(dataset, manifest.shards[0])
    for _, _, members in storage.tar_samples(url):
        return "txt" in members
    return False


@dataclass
class Batch:
    """One micro-batch of one rank.

    ``images [B,3,S,S]`` uint8 pixels (`to` normalizes them); ``tokens [B,L]`` int64, or
    None when the run's objective reads no text (the loader then never decodes or
    tokenizes captions); ``sample_seeds [B]`` int64, a pure function of (seed, epoch, uid)
    for per-sample randomness in the model (MAE's masks), or None when the objective reads
    none (``with_seeds=False``: the loader then spends no time on them); ``uids``.
    """

    images: torch.Tensor
    tokens: torch.Tensor | None
    uids: list[str]
    sample_seeds: torch.Tensor | None = None

    def to(
        self, device: torch.device | str, image_dtype: torch.dtype, fields: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """The named fields moved to `device`; images normalized there (`normalize_pixels`:
        the same float32 values on every device) and cast to `image_dtype`. From a
        `pinned` batch the copies to a GPU run asynchronously."""
        from kiln.models.preprocess import normalize_pixels

        out: dict[str, torch.Tensor] = {}
        for name in fields:
            value = getattr(self, name, None)
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"batch field {name!r} is missing: the loader was built without it "
                    "(with_text=False drops tokens, with_seeds=False sample_seeds)"
                )
            value = value.to(device, non_blocking=True)
            if name == "images":
                value = normalize_pixels(value).to(image_dtype)
            out[name] = value
        return out

    def pinned(self) -> Batch:
        """This batch with its tensors in page-locked memory (a copy), from which a GPU
        copies asynchronously: from pageable memory ``non_blocking`` copies block."""

        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return Batch(self.images.pin_memory(), pin(self.tokens), self.uids, pin(self.sample_seeds))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """How a loader worker hands the batch to its rank (DataLoader pickles it): a batch
        of at most `BY_VALUE_BYTES` goes by value, as numpy arrays written into the worker's
        pipe; a larger one as torch tensors, which DataLoader moves into shared memory and
        passes as file descriptors, each fetched from the worker over a socket. On this
        2-core machine that cost the worker 1.3 ms and the rank 0.8 ms per 0.4-MiB batch
        (`clip-tiny`'s when images went as float32; its pixels are now 0.1 MiB), against
        0.3-0.4 ms each by value; by value costs more from about 0.5 MiB on
        (``benchmarks/README.md``). The values are the same either way."""
        fields = (self.images, self.tokens, self.sample_seeds)
        present = [t for t in fields if t is not None]
        if sum(t.nbytes for t in present) <= BY_VALUE_BYTES and all(
            t.dtype in _NUMPY_DTYPES and t.device.type == "cpu" for t in present
        ):
            arrays = [None if t is None else t.numpy() for t in fields]
            return _batch_from_arrays, (arrays[0], arrays[1], self.uids, arrays[2])
        return Batch, (self.images, self.tokens, self.uids, self.sample_seeds)


#: The largest batch (bytes of its tensors) a loader worker hands over by value (`Batch`).
BY_VALUE_BYTES = 512 * 1024
_NUMPY_DTYPES = (torch.float32, torch.int64, torch.uint8)


def _batch_from_arrays(
    images: np.ndarray, tokens: np.ndarray | None, uids: list[str], seeds: np.ndarray | None
) -> Batch:
    """The `Batch` a by-value hand-over pickled (`Batch.__reduce__`), on the arrays it
    unpickled (no copy)."""
    return Batch(torch.from_numpy(images), _tensor(tokens), uids, _tensor(seeds))


def _tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(array)


def sample_seed(seed: int, epoch: int, uid: str) -> int:
    """A 62-bit seed from (seed, epoch, uid): per-sample randomness that resumes exactly."""
    return int(derive_rng("sample", seed, epoch, uid).integers(2**62))


def _identity(x: Any) -> Any:
    return x


class _EpochStream:
    """One epoch of one rank, from batch `start_step` on: what each logical worker reads
    of it (see the module docstring)."""

    def __init__(self, loader: WebDatasetLoader, segment: Segment, start_step: int) -> None:
        self.root = loader.dataset
        self.manifest = loader.manifest
        self.plan = loader.plan(segment.epoch)
        self.segment = segment
        self.start_step = start_step
        self.rank = loader.rank
        self.num_workers = loader.effective_workers
        self.batch_size = loader.batch_size
        self.shuffle_buffer = loader.shuffle_buffer
        self.seed = loader.seed
        self.augment = loader.augment
        self.fast_decode = loader.fast_decode
        self.fast_decode_version = loader.fast_decode_version
        self.image_size = loader.image_size
        self.context_length = loader.context_length
        self.with_text = loader.with_text
        self.with_seeds = loader.with_seeds

    # -- reading ---------------------------------------------------------------------------
    def _shard_url(self, order_index: int) -> str:
        shard = self.manifest.shards[self.plan.shard_order[order_index]]
        return self.manifest.shard_url(self.root, shard)

    def _read_positions(
        self, wanted: np.ndarray
    ) -> Iterator[tuple[int, str, dict[str, bytes], str]]:
        """(global position, uid, {ext: bytes}, shard url) of each position in `wanted`
        (sorted), in position order. Unwanted samples are walked over by tar header only, and
        shards holding no wanted sample are not opened at all.
        """
        if not len(wanted):
            return
        plan, shards = self.plan, self.manifest.shards
        lo, hi = int(wanted[0]), int(wanted[-1]) + 1
        needed = np.zeros(hi - lo, dtype=bool)
        needed[wanted - lo] = True
        for k, g0 in enumerate(plan.shard_starts):
            shard = shards[plan.shard_order[k]]
            a, b = max(lo, g0) - g0, min(hi, g0 + shard.num_samples) - g0
            if a >= b or not needed[g0 + a - lo : g0 + b - lo].any():
                continue
            url = self._shard_url(k)
            for pos, uid, members in self._read_shard(
                url, g0, a, b, shard.num_samples, lambda p: bool(needed[p - lo])
            ):
                yield pos, uid, members, url

    def _read_shard(
        self,
        url: str,
        g0: int,
        a: int,
        b: int,
        expected: int,
        needed: Callable[[int], bool],
    ) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        count = 0
        samples = storage.tar_samples(url, read=lambda i: a <= i < b and needed(g0 + i))
        for i, key, members in samples:
            if i >= b:
                break
            count = i + 1
            if i >= a and needed(g0 + i):
                yield g0 + i, key.rpartition("/")[2], members
        else:
            if count != expected:
                raise ValueError(
                    f"shard {url!r} holds {count} samples but the manifest says "
                    f"{expected}: the dataset changed after its manifest was written; "
                    "re-run `kiln curate` or fix manifest.json"
                )

    # -- decoding --------------------------------------------------------------------------
    def _decode(self, uid: str, members: dict[str, bytes], url: str) -> tuple[torch.Tensor, str]:
        """The sample's transformed ``uint8 [3, S, S]`` pixels and its caption."""
        from kiln.training.transforms import image_pixels, sample_rng

        image_ext = next((e for e in _IMAGE_EXTS if e in members), None)
        if image_ext is None or (self.with_text and "txt" not in members):
            need = "{uid}.jpg and {uid}.txt" if self.with_text else "{uid}.jpg"
            raise ValueError(
                f"sample {uid!r} in shard {url!r} has members {sorted(members)}: each sample "
                f"needs {need} (re-shard the dataset with `kiln curate`)"
            )
        rng = sample_rng(self.seed, self.plan.epoch, uid) if self.augment else None
        try:
            pixels = image_pixels(
                members[image_ext],
                self.image_size,
                augment=self.augment,
                rng=rng,
                fast_decode=self.fast_decode,
                fast_decode_version=self.fast_decode_version,
            )
        except ValueError as e:
            raise ValueError(f"sample {uid!r} in shard {url!r}: {e}") from e
        if not self.with_text:
            return pixels, ""
        return pixels, members["txt"].decode("utf-8", errors="replace")

    def _batch(self, samples: list[tuple[str, dict[str, bytes], str]]) -> Batch:
        from kiln.models.tokenizer import tokenize
        from kiln.training.transforms import stack_pixels

        images, texts, uids = [], [], []
        for uid, members, url in samples:
            img, text = self._decode(uid, members, url)
            images.append(img)
            texts.append(text)
            uids.append(uid)
        tokens = tokenize(texts, self.context_length) if self.with_text else None
        seeds = None
        if self.with_seeds:
            seeds = torch.tensor([sample_seed(self.seed, self.plan.epoch, u) for u in uids])
        return Batch(stack_pixels(images), tokens, uids, seeds)

    # -- one logical worker ----------------------------------------------------------------
    def logical_stream(self, logical_worker: int) -> Iterator[Batch]:
        """Batches of `logical_worker` with segment index >= start_step, in order."""
        seg, bsz = self.segment, self.batch_size
        w = seg.layout.num_workers
        positions = seg.worker_positions(self.rank, logical_worker)
        order = seg.emit_order(self.seed, self.rank, logical_worker, len(positions))
        skip = len(range(logical_worker, self.start_step, w)) * bsz
        if skip >= len(positions):
            return
        rest = order[skip:]
        cache: dict[int, tuple[str, dict[str, bytes], str]] = {}
        ptr, batch = 0, []
        for pos, uid, members, url in self._read_positions(np.sort(positions[rest])):
            cache[int(np.searchsorted(positions, pos))] = (uid, members, url)
            while ptr < len(rest) and int(rest[ptr]) in cache:
                batch.append(cache.pop(int(rest[ptr])))
                ptr += 1
                if len(batch) == bsz:
                    yield self._batch(batch)
                    batch = []
        if ptr != len(rest) or batch:  # pragma: no cover - a bug, not bad input
            raise RuntimeError(
                f"loader emitted {ptr} of {len(rest)} samples for worker {logical_worker}"
            )


class _RunStream(IterableDataset):
    """Every epoch of one rank from the loader's position on, for one DataLoader that lives
    as long as the loader's iterator: its worker processes start once, not once per epoch
    (a worker forked from a rank copies each page the rank writes while it lives, so a
    fresh worker per epoch cost a large model's rank seconds of page faults each epoch).

    DataLoader takes batches from its W workers round-robin, so the k-th batch out of it
    (counting from this stream's start) is made by physical worker ``k % W``. In an epoch
    whose first batch handed out is segment batch `start` and whose batches begin at
    ``k = delivered``, batch j is the ``delivered + j - start``-th out: physical worker w
    plays logical worker ``(w - delivered + start) % W`` (module docstring, step 5).
    """

    def __init__(self, loader: WebDatasetLoader, segment: Segment, start_step: int) -> None:
        self.loader = loader
        self.segment = segment
        self.start_step = start_step

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        workers = self.loader.effective_workers
        if info is None:  # in the rank's process: the workers take turns, as processes do
            streams = [self._worker(physical) for physical in range(workers)]
            while True:
                for stream in streams:
                    yield next(stream)
        if info.num_workers != workers:  # pragma: no cover - guarded by WebDatasetLoader
            raise RuntimeError(f"expected {workers} workers, DataLoader has {info.num_workers}")
        yield from self._worker(info.id)

    def _worker(self, physical: int) -> Iterator[Batch]:
        """The batches of physical worker `physical`, epoch after epoch."""
        loader, workers = self.loader, self.loader.effective_workers
        segment, start, delivered = self.segment, self.start_step, 0
        while True:
            if start < segment.steps:  # (an elastic resume can leave less than a batch)
                epoch = _EpochStream(loader, segment, start)
                yield from epoch.logical_stream((physical - delivered + start) % workers)
                delivered += segment.steps - start
            segment, start = loader._first_segment(segment.epoch + 1), 0


class WebDatasetLoader:
    """Endless iterator of one rank's batches, epoch after epoch, with a resumable position.

    `state_dict()` is the position after the batches handed out so far; a loader built with
    the same arguments and given that state continues with exactly the next batch. A loader
    with another layout (world size, workers, batch size, shuffle buffer) given that state
    continues the epoch with the samples not yet read (elastic resume, see `Segment`).
    """

    def __init__(
        self,
        dataset: str,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 256,
        augment: bool = True,
        fast_decode: bool = False,
        image_size: int = 32,
        context_length: int = 48,
        with_text: bool = True,
        with_seeds: bool = True,
        balance_t: int | None = None,
        worker_cpus: tuple[int, ...] | None = None,
        in_rank: bool = False,
        pin_memory: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside world_size={world_size}")
        self.dataset = dataset
        self.manifest = read_manifest(dataset)
        self.manifest_hash = manifest_hash(self.manifest)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.effective_workers = max(1, num_workers)
        self.shuffle_buffer = shuffle_buffer
        self.augment = augment
        self.fast_decode = fast_decode
        # the version of the fast-decode pixels: a resumed run's is its state's
        self.fast_decode_version = FAST_DECODE_VERSION
        self.image_size = image_size
        self.context_length = context_length
        self.with_text = with_text
        self.with_seeds = with_seeds
        # the cores loader workers run on (`kiln.training.cpu_binding`); None: unbound
        self.worker_cpus = worker_cpus
        # the workers run in this process, taking turns (the same batches as processes)
        self.in_rank = in_rank or num_workers == 0
        # batches come in page-locked memory (`Batch.pinned`), for a rank on a GPU
        self.pin_memory = pin_memory
        self._sizes = [s.num_samples for s in self.manifest.shards]
        self.balance = (
            OnlineBalance(dataset, self.manifest, balance_t) if balance_t is not None else None
        )
        self._kept_cache: dict[int, np.ndarray] = {}
        self.layout = Layout(world_size, self.effective_workers, batch_size, shuffle_buffer)
        # epoch 0's (with online balancing the count varies a little by epoch)
        first = self.plan(0).steps_per_epoch if self.balance is None else None
        self.steps_per_epoch = first if first is not None else self._first_segment(0).steps
        if self.steps_per_epoch == 0:
            held = self.manifest.num_samples if self.balance is None else len(self._kept(0))
            balanced = f" (online balancing at t={balance_t} keeps {held})" if self.balance else ""
            raise ValueError(
                f"dataset {dataset!r} has {self.manifest.num_samples} samples{balanced}, fewer "
                f"than one global batch (world_size={world_size} x data.batch_size="
                f"{batch_size}): lower data.batch_size"
                + (", raise data.balance.t" if self.balance else "")
                + " or use a bigger dataset"
            )
        self.epoch = 0
        self.step_in_epoch = 0  # batches read in the current segment of the epoch
        self._history: list[tuple[Layout, int]] = []  # earlier segments of this epoch
        self._segment: Segment | None = None
        self._iterating = False

    @classmethod
    def from_config(
        cls,
        cfg: TrainConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        with_text: bool = True,
        with_seeds: bool = True,
        worker_cpus: tuple[int, ...] | None = None,
        in_rank: bool = False,
        pin_memory: bool = False,
    ) -> WebDatasetLoader:
        """The loader a training run of `cfg` gives `rank` of `world_size` ranks (what the
        training loop reads, what a resume check or a test must read alike).
        `worker_cpus`: the cores its worker processes run on (None: wherever the kernel
        puts them). `in_rank`: its workers run in this process instead (the same
        batches; `kiln.training.cpu_binding.loader_in_rank` decides for a run).
        `pin_memory`: hand batches over in page-locked memory (a rank on a GPU)."""
        return cls(
            cfg.data.dataset,
            batch_size=cfg.data.batch_size,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            augment=cfg.data.augment,
            fast_decode=cfg.data.fast_decode,
            image_size=cfg.model.image_size,
            context_length=cfg.model.context_length,
            with_text=with_text,
            with_seeds=with_seeds,
            balance_t=cfg.data.balance.t if cfg.data.balance.mode == "online" else None,
            worker_cpus=worker_cpus,
            in_rank=in_rank,
            pin_memory=pin_memory,
        )

    def plan(self, epoch: int) -> EpochPlan:
        """The index plan of `epoch` (pure; see `plan_epoch`)."""
        return plan_epoch(
            self._sizes,
            seed=self.seed,
            epoch=epoch,
            world_size=self.world_size,
            batch_size=self.batch_size,
        )

    def _kept(self, epoch: int) -> np.ndarray:
        """Sorted global positions online balancing keeps in `epoch` (pure; two cached)."""
        assert self.balance is not None
        if epoch not in self._kept_cache:
            plan = self.plan(epoch)
            keep = self.balance.keep(self.seed, epoch)
            if len(self._kept_cache) >= 2:
                self._kept_cache.pop(min(self._kept_cache))
            self._kept_cache[epoch] = kept_positions(
                keep, self._sizes, plan.shard_order, plan.shard_starts
            )
        return self._kept_cache[epoch]

    def _plan_segment(
        self, epoch: int, history: Sequence[tuple[Layout, int]], layout: Layout
    ) -> Segment:
        kept = self._kept(epoch) if self.balance is not None else None
        return plan_segment(sum(self._sizes), self.seed, epoch, history, layout, kept)

    def _first_segment(self, epoch: int) -> Segment:
        return self._plan_segment(epoch, [], self.layout)

    def segment(self) -> Segment:
        """The segment of the current epoch this loader reads (pure; cached)."""
        if self._segment is None or self._segment.epoch != self.epoch:
            self._segment = self._plan_segment(self.epoch, self._history, self.layout)
        return self._segment

    # -- state ---------------------------------------------------------------------------
    def _identity_fields(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "augment": self.augment,
            "fast_decode": self.fast_decode,
            "manifest_hash": self.manifest_hash,
            "balance": self.balance.identity if self.balance is not None else None,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position (epoch, batches read in its current segment, earlier segments' layouts
        and batch counts) plus the layout and the identity the position is valid for."""
        return {
            "version": LOADER_STATE_VERSION,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "steps_per_epoch": self.segment().steps,
            "history": [{**lay.as_dict(), "steps": n} for lay, n in self._history],
            **self.layout.as_dict(),
            **self._identity_fields(),
            "fast_decode_version": self.fast_decode_version,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`. Errors if it belongs to another dataset, seed or
        augmentation; a different layout continues the epoch with its unread samples."""
        if self._iterating:
            raise RuntimeError("load_state_dict() must be called before iterating the loader")
        version = state.get("version")
        if version not in (1, 2, LOADER_STATE_VERSION):
            raise ValueError(
                f"loader state version {version!r} is not {LOADER_STATE_VERSION}: this "
                "checkpoint was written by another kiln version"
            )
        fixes = {
            "seed": "set seed to the value the run started with",
            "augment": "set data.augment to the value the run started with",
            "fast_decode": "set data.fast_decode to the value the run started with (it "
            "changes the pixels the model sees)",
            "manifest_hash": "the dataset's shards changed since the checkpoint: point "
            "data.dataset at the original dataset or start a new run",
            "balance": "set data.balance to the value the run started with (it decides "
            "which samples each epoch holds), or start a new run",
        }
        for name, mine in self._identity_fields().items():
            theirs = state.get(name, _STATE_DEFAULTS.get(name))
            if theirs != mine:
                raise ValueError(
                    f"cannot resume the data loader: checkpoint has {name}={theirs!r} "
                    f"but this run has {name}={mine!r}; {fixes[name]}"
                )
        try:
            saved = Layout(*(int(state[f.name]) for f in dataclasses.fields(Layout)))
            history = [
                (Layout(*(int(h[f.name]) for f in dataclasses.fields(Layout))), int(h["steps"]))
                for h in state.get("history", [])
            ]
            epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
            decode_version = int(state.get("fast_decode_version", _FIRST_FAST_DECODE_VERSION))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"loader state is malformed ({type(e).__name__}: {e})") from e
        segment = self._plan_segment(epoch, history, saved)
        if not 0 <= step < max(1, segment.steps) or epoch < 0:
            raise ValueError(
                f"loader state epoch={epoch} step_in_epoch={step} is out of range "
                f"(that segment has {segment.steps} steps)"
            )
        if saved != self.layout:
            if step > 0:  # the old layout's part of this epoch is read
                history.append((saved, step))
            step = 0  # (a segment that read nothing is simply replaced)
        if decode_version not in FAST_DECODE_VERSIONS:
            raise ValueError(
                f"loader state has fast_decode_version={decode_version}, which this kiln does not "
                f"know (it knows {FAST_DECODE_VERSIONS}): resume with the kiln that wrote it"
            )
        self.epoch, self.step_in_epoch, self._history = epoch, step, history
        self.fast_decode_version = decode_version  # the pixels the run started with
        self._segment = None

    # -- iteration -----------------------------------------------------------------------
    def _dataloader(self, segment: Segment, start: int) -> DataLoader:
        stream = _RunStream(self, segment, start)
        # An explicit generator keeps DataLoader from drawing its worker base seed from the
        # global torch RNG, which would make the training RNG depend on when epochs start.
        gen = torch.Generator().manual_seed(int(derive_rng("dl", self.seed).integers(2**62)))
        processes = 0 if self.in_rank else self.num_workers
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=processes,
            collate_fn=_identity,
            generator=gen,
            in_order=True,
            persistent_workers=False,
            prefetch_factor=2 if processes else None,
            worker_init_fn=(
                functools.partial(bind_worker, self.worker_cpus)
                if self.worker_cpus and processes
                else None
            ),
        )

    def _next_epoch(self) -> None:
        self.epoch, self.step_in_epoch, self._history = self.epoch + 1, 0, []

    def _skip_spent_epochs(self) -> None:
        """Move past segments with no batch left (an elastic resume can leave less than a
        global batch of an epoch), as `_RunStream` does."""
        while self.step_in_epoch >= self.segment().steps:
            self._next_epoch()

    def __iter__(self) -> Iterator[Batch]:
        if self._iterating:
            raise RuntimeError("WebDatasetLoader supports one active iterator at a time")
        self._iterating = True
        batches: Iterator[Batch] | None = None
        try:
            self._skip_spent_epochs()
            # one DataLoader for every epoch from here on (`_RunStream`); the position
            # counts batches handed to the consumer, not prefetched ones
            loader = self._dataloader(self.segment(), self.step_in_epoch)
            # with worker processes, each batch's hand-over (unpickling it from the worker's
            # pipe, `Batch.__reduce__`) happens on a thread while the consumer computes
            batches = iter(loader)  # (workers fork here, on the consumer's thread)
            if self.pin_memory:  # on the hand-over thread, with worker processes
                batches = (batch.pinned() for batch in batches)
            if not self.in_rank:
                batches = Prefetched(batches, name="kiln-loader")
            for batch in batches:
                self.step_in_epoch += 1
                if self.step_in_epoch == self.segment().steps:
                    self._next_epoch()
                    self._skip_spent_epochs()
                yield batch
            raise RuntimeError("the loader's stream ended")  # pragma: no cover - endless
        finally:
            if isinstance(batches, Prefetched):
                batches.close()
            self._iterating = False
