"""A bound on the memory that decoding takes across all in-flight requests.

Each request reserves what decoding its image will allocate (known from the header, before a
pixel is decoded) and gives it back once the pixels have become model input. When the budget
is full, a request waits a little; if room does not come, it is refused as "busy" (HTTP 503
with Retry-After), so no mix of valid requests can take the process past the budget.

Only one budget's worth may wait: a request that would not fit even once everything now
decoding is done, because others already wait for that room, is refused at once. Under a flood
of big images (a 40 MP PNG takes 720 MiB of the default 1 GiB) request threads then do not sit
out the wait only to be refused, and the refusal comes in milliseconds, not seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class BudgetExceededError(Exception):
    """One request alone needs more than the whole budget: it can never be served."""


class BudgetBusyError(Exception):
    """The budget stayed full for the whole wait: try again shortly."""


class MemoryBudget:
    def __init__(self, capacity_bytes: int, wait_seconds: float = 2.0):
        self.capacity = int(capacity_bytes)
        self.wait_seconds = wait_seconds
        self._used = 0
        self._waiting = 0  # bytes that requests waiting for room want
        self._peak = 0
        self._freed = threading.Condition()

    @property
    def used(self) -> int:
        return self._used

    @property
    def peak(self) -> int:
        """The most ever reserved at once."""
        return self._peak

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the ``with`` block."""
        nbytes = max(0, int(nbytes))
        if nbytes > self.capacity:
            raise BudgetExceededError(f"decoding needs {nbytes / 2**20:,.0f} MiB, more than the service's "
                                      f"whole decode budget of {self.capacity / 2**20:,.0f} MiB")
        deadline = time.monotonic() + self.wait_seconds
        with self._freed:
            if self._used + nbytes > self.capacity:
                if self._waiting + nbytes > self.capacity:
                    raise BudgetBusyError("the service is decoding as many images as its memory budget allows, "
                                          "and others already wait for room")
                self._waiting += nbytes
                try:
                    while self._used + nbytes > self.capacity:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise BudgetBusyError("the service is decoding as many images as its memory budget "
                                                  "allows")
                        self._freed.wait(left)
                finally:
                    self._waiting -= nbytes
            self._used += nbytes
            self._peak = max(self._peak, self._used)
        try:
            yield
        finally:
            with self._freed:
                self._used -= nbytes
                self._freed.notify_all()
