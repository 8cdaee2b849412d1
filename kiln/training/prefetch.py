"""Take an iterator's items on a background thread, ahead of the consumer.

A DataLoader with worker processes hands each batch over on the consumer's thread: the
batch is unpickled from the worker's pipe (a large batch's tensors arrive as shared-memory
file descriptors, fetched one by one from the worker over a socket), and the next index
goes out through a feeder thread. That was 1-3 ms of a training rank's time per batch on a
small machine, spent waiting, not computing (the rank's step is 20-40 ms on the
quickstart's model). `Prefetched` does that hand-over on its own thread while the rank
computes (torch releases the GIL inside its kernels), so the rank takes a batch that is
already whole. PyTorch's own pin-memory thread does the same for GPUs.

The items come in the iterator's order (one producer, one FIFO queue); an exception the
iterator raises is raised to the consumer at the point it would have come, with its own
traceback; `close` stops the thread and closes the iterator on it (a DataLoader's
iterator shuts its workers down when closed or dropped). Create the iterator on the
consumer's thread (``Prefetched(iter(loader))``): a DataLoader forks its workers then, and
a fork from the main thread is the one DataLoader is made for; from then on only the
prefetch thread touches it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["Prefetched"]

T = TypeVar("T")

_ITEM, _ERROR, _END = 0, 1, 2
#: how often a blocked thread looks whether it was told to stop (seconds)
_POLL_S = 0.1


class Prefetched(Generic[T]):
    """Take `source`'s items on a daemon thread, up to `depth` ahead of the consumer.

    Use as an iterator; call `close` (or use it as a context manager) when done early.
    The thread closes and drops `source` when it ends.
    """

    def __init__(self, source: Iterator[T], *, depth: int = 2, name: str = "kiln-prefetch"):
        if depth < 1:
            raise ValueError(f"depth={depth} must be at least 1")
        self._queue: queue.Queue[tuple[int, object]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(source,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item: tuple[int, object]) -> bool:
        """Queue `item` unless told to stop first; whether it was queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put((_ITEM, item)):
                    return
            self._put((_END, None))
        except BaseException as e:  # handed to the consumer, raised there
            self._put((_ERROR, e))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
            del source  # a DataLoader iterator shuts its workers down here

    def __iter__(self) -> Prefetched[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value  # type: ignore[return-value]
        self._done = True
        self.close()
        if kind == _ERROR:
            assert isinstance(value, BaseException)
            raise value
        raise StopIteration

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and let it close the source; waits up to `timeout` seconds for
        the item it is taking to arrive (a DataLoader notices a dead worker within 5 s);
        the thread is a daemon, so it never holds up the process's exit."""
        self._done = True
        self._stop.set()
        while True:  # unblock a producer waiting for room
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> Prefetched[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
