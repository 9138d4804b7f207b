"""Give memory back to the OS after a burst of big decodes.

glibc keeps freed memory in its arenas for reuse. After a burst of large images (a 16 MP PNG
takes ~290 MiB to decode and resize) that memory stays resident although nothing uses it: in
bench_overload.py's memory part RSS stayed 76-327 MiB above its level before the burst. Making
glibc return big blocks at once (a fixed ``M_MMAP_THRESHOLD``, or ``M_TRIM_THRESHOLD`` 0) fixed
that but cost 25-55% of the service's throughput on ordinary photos, because TensorFlow's own big
temporaries then paid page faults on every call. So the pages are given back only when a big
decode ends: a ``malloc_trim(0)`` shortly after, once no other big decode is in flight, at most a
few times a second.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None

BIG_BYTES = 64 << 20     # a decode reservation at least this big is followed by a trim
DELAY_S = 0.2            # after the release, so that a burst ends in one trim, not one per image


def malloc_trim() -> bool:
    """Return free memory at the top and in the middle of every glibc arena to the OS; False off glibc."""
    if _LIBC is None or not hasattr(_LIBC, "malloc_trim"):
        return False
    _LIBC.malloc_trim(0)
    return True


class BurstTrimmer:
    """Schedules a trim after a big reservation ends; ``busy()`` says whether one is still in flight."""

    def __init__(self, busy: Callable[[], bool], delay_s: float = DELAY_S):
        self._busy = busy
        self._delay_s = delay_s
        self._lock = threading.Lock()
        self._pending = False
        self.trims = 0

    def released(self, nbytes: int) -> None:
        """A reservation of ``nbytes`` ended."""
        if nbytes < BIG_BYTES:
            return
        with self._lock:
            if self._pending:
                return
            self._pending = True
        self._schedule()

    def _schedule(self) -> None:
        timer = threading.Timer(self._delay_s, self._trim)
        timer.daemon = True
        timer.start()

    def _trim(self) -> None:
        if self._busy():
            # Look again shortly rather than leave it to the next big release: what keeps the budget
            # busy may be small reservations (photos), which never schedule a trim, so the pages of
            # the burst would stay resident until the next big image.
            self._schedule()
            return
        with self._lock:
            # Cleared only now: a big release from here on schedules its own trim after this one.
            self._pending = False
        started = time.perf_counter()
        if malloc_trim():
            self.trims += 1
            self.last_trim_s = time.perf_counter() - started
