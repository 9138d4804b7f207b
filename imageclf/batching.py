"""Dynamic micro-batching: concurrent requests share one ``Session.run``.

There is no background thread. The first request to arrive opens a batch and leads it. If
another batch is running, which is the sign of concurrent traffic, the leader waits up to
``max_wait`` seconds (or until the batch is full) for others to join; otherwise it runs at
once, so a lone client never waits. The leader runs the whole batch and hands each member its
own row. While a batch runs, new arrivals open the next one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Batch(Generic[Item]):
    def __init__(self) -> None:
        self.items: list[Item] = []
        self.full = threading.Event()
        self.done = threading.Event()
        self.results: Sequence | None = None
        self.error: BaseException | None = None


class MicroBatcher(Generic[Item, Result]):
    def __init__(self, run_batch: Callable[[list[Item]], Sequence[Result]], max_batch: int = 16,
                 max_wait: float = 0.002):
        self.run_batch = run_batch
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait)
        self._lock = threading.Lock()
        self._open: _Batch | None = None
        self._running = 0  # batches inside run_batch now

    def submit(self, item: Item) -> Result:
        """Run ``item`` in a batch with whatever else arrives meanwhile; return its result."""
        with self._lock:
            batch, leader = self._open, False
            if batch is None:
                batch, leader = _Batch(), True
                self._open = batch
            index = len(batch.items)
            batch.items.append(item)
            if len(batch.items) >= self.max_batch:
                self._open = None  # closed to newcomers
                batch.full.set()
        if leader:
            self._lead(batch)
        else:
            batch.done.wait()
        if batch.error is not None:
            raise batch.error
        return batch.results[index]

    def _lead(self, batch: _Batch) -> None:
        with self._lock:
            busy = self._running > 0
        if busy and self.max_wait and self.max_batch > 1:
            batch.full.wait(self.max_wait)
        with self._lock:
            if self._open is batch:
                self._open = None
            self._running += 1
        try:
            batch.results = self.run_batch(batch.items)
        except BaseException as e:  # noqa: BLE001 - every member of the batch must hear about it
            batch.error = e
        finally:
            with self._lock:
                self._running -= 1
            batch.done.set()
