"""`kiln.training.prefetch.Prefetched`: the items in order, the source's error where it
happened, and an early close that stops the thread and closes the source."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from kiln.training.prefetch import Prefetched


def test_items_in_order_then_the_end() -> None:
    assert list(Prefetched(iter(range(1000)), depth=3)) == list(range(1000))
    assert list(Prefetched(iter([]))) == []


def test_the_sources_error_comes_where_it_happened() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise KeyError("shard 7 is gone")

    items = Prefetched(source())
    assert next(items) == 1
    assert next(items) == 2
    with pytest.raises(KeyError, match="shard 7 is gone"):
        next(items)
    with pytest.raises(StopIteration):
        next(items)


def test_the_source_runs_on_another_thread_and_at_most_depth_ahead() -> None:
    threads, taken = set(), []

    def source() -> Iterator[int]:
        for i in range(100):
            threads.add(threading.current_thread().name)
            taken.append(i)
            yield i

    items = Prefetched(source(), depth=2, name="test-prefetch")
    assert next(items) == 0
    time.sleep(0.3)
    # one handed over, `depth` queued, one held by the thread waiting for room
    assert len(taken) == 4
    assert threads == {"test-prefetch"}
    items.close()


def test_close_stops_the_thread_and_closes_the_source() -> None:
    closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    with Prefetched(source(), depth=2) as items:
        assert [next(items) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert closed.wait(5)
    assert not items._thread.is_alive()
    with pytest.raises(StopIteration):
        next(items)


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth=0 must be at least 1"):
        Prefetched(iter([1]), depth=0)
