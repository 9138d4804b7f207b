"""Dynamic micro-batching: concurrent requests share one ``Session.run``.

There is no background thread. The first request to arrive opens a batch and leads it. If
another batch is running, which is the sign of concurrent traffic, the leader lets others join
until the batch is full, the other batches have finished, or ``max_wait`` seconds have passed;
otherwise it runs at once, so a lone client never waits. The leader runs the whole batch and
hands each member its own rows. While a batch runs, new arrivals open the next one.

A model that can run only so many calls at once (LiteRT: one per interpreter) says so with
``max_running``: a leader whose turn has come waits for a free call, and its batch stays open
meanwhile, so requests that arrive join it instead of queueing up as many small batches.

A request with many items (a TF Serving ``:predict`` with many instances) fills the open batch
and opens as many more as it needs, never more than ``max_batch`` items per model call.
Members wait at most ``timeout`` seconds for a batch they do not lead, so a hung model call
cannot hold every request thread forever.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class BatchTimeoutError(TimeoutError):
    """The batch holding this request did not finish within the batcher's timeout."""


class BatchFailedError(RuntimeError):
    """The model call for this request's batch raised; ``__cause__`` is the original error."""


class _Batch(Generic[Item]):
    def __init__(self, wait_for_company: bool) -> None:
        self.items: list[Item] = []
        self.wait_for_company = wait_for_company
        self.done = threading.Event()
        self.results: Sequence | None = None
        self.error: BaseException | None = None


@dataclass
class _Part:
    """Where some of one request's items sit: ``count`` items of ``batch`` from ``start``."""

    batch: _Batch
    start: int
    count: int
    leader: bool


class MicroBatcher(Generic[Item, Result]):
    def __init__(self, run_batch: Callable[[list[Item]], Sequence[Result]], max_batch: int = 8,
                 max_wait: float = 0.002, timeout: float = 30.0, max_running: int | None = None):
        self.run_batch = run_batch
        self.max_running = max_running
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait)
        self.timeout = max(0.001, timeout)
        self._changed = threading.Condition()  # guards the fields below; notified when they change
        self._open: _Batch | None = None
        self._in_flight = 0  # batches opened and not yet finished, the open one included
        self._running = 0    # batches in their model call
        self.stats = {"batches": 0, "items": 0, "largest": 0}  # model calls made, for metrics and tests

    def submit(self, item: Item) -> Result:
        """Run ``item`` in a batch with whatever else arrives meanwhile; return its result."""
        return self.submit_many([item])[0]

    def submit_many(self, items: Sequence[Item]) -> list[Result]:
        """Run ``items`` in one or more batches (shared with other requests); their results in order.

        Raises BatchTimeoutError if a batch led by another request does not finish in time,
        and BatchFailedError (a new one for each request) if a model call raised.
        """
        parts = self._join(items)
        for part in parts:
            if part.leader:
                self._lead(part.batch)
        deadline = time.monotonic() + self.timeout
        results: list[Result] = []
        for part in parts:
            if not part.batch.done.wait(max(0.0, deadline - time.monotonic())):
                raise BatchTimeoutError(f"the model did not answer within {self.timeout:g} s")
            error = part.batch.error
            if isinstance(error, BatchTimeoutError):
                raise BatchTimeoutError(str(error))
            if error is not None:
                raise BatchFailedError(f"model call failed: {type(error).__name__}: {error}") from error
            results.extend(part.batch.results[part.start:part.start + part.count])
        return results

    def _join(self, items: Sequence[Item]) -> list[_Part]:
        parts = []
        with self._changed:
            taken = 0
            while taken < len(items):
                batch, leader = self._open, False
                if batch is None:
                    wait = self._in_flight > 0 and self.max_wait > 0 and self.max_batch > 1
                    batch, leader = _Batch(wait_for_company=wait), True
                    self._open = batch
                    self._in_flight += 1
                chunk = items[taken:taken + self.max_batch - len(batch.items)]
                parts.append(_Part(batch, len(batch.items), len(chunk), leader))
                batch.items.extend(chunk)
                taken += len(chunk)
                if len(batch.items) >= self.max_batch:
                    self._open = None  # closed to newcomers
                    self._changed.notify_all()
        return parts

    def _lead(self, batch: _Batch) -> None:
        with self._changed:
            if batch.wait_for_company and self._open is batch:
                self._changed.wait_for(lambda: len(batch.items) >= self.max_batch or self._in_flight == 1,
                                       timeout=self.max_wait)
            if self.max_running and not self._changed.wait_for(lambda: self._running < self.max_running,
                                                               timeout=self.timeout):
                self._fail(batch, BatchTimeoutError(f"the model did not answer within {self.timeout:g} s"))
                return
            if self._open is batch:
                self._open = None
            self._running += 1
            self.stats["batches"] += 1
            self.stats["items"] += len(batch.items)
            self.stats["largest"] = max(self.stats["largest"], len(batch.items))
        try:
            batch.results = self.run_batch(batch.items)
            if len(batch.results) != len(batch.items):
                raise RuntimeError(f"run_batch returned {len(batch.results)} results for {len(batch.items)} items")
        except Exception as e:  # noqa: BLE001 - every member of the batch must hear about it
            batch.error = e
        finally:
            if batch.results is None and batch.error is None:
                batch.error = RuntimeError("the model call was interrupted")
            batch.items = []  # the inputs are no longer needed; do not keep them alive with the batch
            with self._changed:
                self._in_flight -= 1
                self._running -= 1
                self._changed.notify_all()
            batch.done.set()

    def _fail(self, batch: _Batch, error: BaseException) -> None:
        """End a batch that never ran (called holding ``_changed``)."""
        if self._open is batch:
            self._open = None
        batch.error, batch.items = error, []
        self._in_flight -= 1
        self._changed.notify_all()
        batch.done.set()
