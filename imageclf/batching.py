"""Dynamic micro-batching: concurrent requests share one ``Session.run``.

There is no background thread. The first request to arrive opens a batch and leads it. If
another batch is running, which is the sign of concurrent traffic, the leader lets others join
until the batch is full, the other batches have finished, or ``max_wait`` seconds have passed;
otherwise it runs at once, so a lone client never waits. The leader runs the whole batch and
hands each member its own row. While a batch runs, new arrivals open the next one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Batch(Generic[Item]):
    def __init__(self, wait_for_company: bool) -> None:
        self.items: list[Item] = []
        self.wait_for_company = wait_for_company
        self.done = threading.Event()
        self.results: Sequence | None = None
        self.error: BaseException | None = None


class MicroBatcher(Generic[Item, Result]):
    def __init__(self, run_batch: Callable[[list[Item]], Sequence[Result]], max_batch: int = 16,
                 max_wait: float = 0.002):
        self.run_batch = run_batch
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait)
        self._changed = threading.Condition()  # guards the fields below; notified when they change
        self._open: _Batch | None = None
        self._in_flight = 0  # batches opened and not yet finished, the open one included

    def submit(self, item: Item) -> Result:
        """Run ``item`` in a batch with whatever else arrives meanwhile; return its result."""
        with self._changed:
            batch, leader = self._open, False
            if batch is None:
                wait = self._in_flight > 0 and self.max_wait > 0 and self.max_batch > 1
                batch, leader = _Batch(wait_for_company=wait), True
                self._open = batch
                self._in_flight += 1
            index = len(batch.items)
            batch.items.append(item)
            if len(batch.items) >= self.max_batch:
                self._open = None  # closed to newcomers
                self._changed.notify_all()
        if leader:
            self._lead(batch)
        else:
            batch.done.wait()
        if batch.error is not None:
            raise batch.error
        return batch.results[index]

    def _lead(self, batch: _Batch) -> None:
        with self._changed:
            if batch.wait_for_company:
                self._changed.wait_for(lambda: len(batch.items) >= self.max_batch or self._in_flight == 1,
                                       timeout=self.max_wait)
            if self._open is batch:
                self._open = None
        try:
            batch.results = self.run_batch(batch.items)
        except BaseException as e:  # noqa: BLE001 - every member of the batch must hear about it
            batch.error = e
        finally:
            with self._changed:
                self._in_flight -= 1
                self._changed.notify_all()
            batch.done.set()
