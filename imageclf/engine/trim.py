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
import os
import threading
import time
from collections.abc import Callable

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None

BIG_BYTES = 64 << 20     # a decode reservation at least this big is followed by a trim
DELAY_S = 0.2            # after the release, so that a burst ends in one trim, not one per image
#: Malloc arenas the service's threads share (glibc's default: 8 per core). Each request thread
#: otherwise gets an arena of its own, which keeps what the thread's last big decode freed: two
#: pixel bombs decoded one after the other by two threads peaked 432-443 MiB above the start in a
#: fresh process, 226-230 MiB with two arenas; under 256 clients RSS was 900-927 MiB against
#: 1,008-1,061, at the same throughput (benchmarks/README.md, "Malloc arenas").
SERVICE_ARENAS = 2
_M_ARENA_MAX = -8        # mallopt's parameter number (malloc.h)


def malloc_trim() -> bool:
    """Return free memory at the top and in the middle of every glibc arena to the OS; False off glibc."""
    if _LIBC is None or not hasattr(_LIBC, "malloc_trim"):
        return False
    _LIBC.malloc_trim(0)
    return True


def limit_malloc_arenas(count: int = SERVICE_ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``count`` for the threads that make new ones from now on, unless the
    environment already says how many (``MALLOC_ARENA_MAX``: the operator's choice wins). False off glibc."""
    if os.environ.get("MALLOC_ARENA_MAX") or _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return False
    return bool(_LIBC.mallopt(_M_ARENA_MAX, count))


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
