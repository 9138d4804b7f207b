"""``retrain.py --watch``: retrain whenever the image folder changes, hands-free.

The folder is polled (portable, and cheap next to a retrain): a new, removed or changed class
folder or image changes its signature. A change is acted on once the folder has stayed the same
for ``settle`` seconds, so a folder still being copied in is not trained on half-way. Each
retrain is incremental (cached bottlenecks) and replaces the graph atomically, so a running
service picks the new classes up by itself. A retrain that fails on the user's data (a new class
with one picture so far...) is reported and the watch goes on.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from imageclf.errors import UserError


def tree_signature(root: str | Path) -> frozenset:
    """Every visible file below ``root`` with its size and modification time."""
    entries = set()
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:  # removed while we looked: the next poll sees the folder as it is
                continue
            entries.add((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    return frozenset(entries)


def watch(root: str | Path, run: Callable[[], None], log: Callable[[str], None], *, interval: float = 2.0,
          settle: float = 3.0, stop: threading.Event | None = None, max_runs: int | None = None) -> int:
    """Call ``run`` now and after every settled change of ``root``; returns the number of runs."""
    stop = stop or threading.Event()
    runs = 0
    trained_on = None
    while not stop.is_set() and (max_runs is None or runs < max_runs):
        current = tree_signature(root)
        if current != trained_on:
            if trained_on is not None:
                current = _settled(root, current, settle, interval, stop)
                if current is None:
                    break
                log(f"Change in {root}: retraining")
            trained_on = current
            runs += 1
            _run_once(run, log)
            log(f"Watching {root} for changes (Ctrl-C to stop)")
        stop.wait(interval)
    return runs


def _settled(root, seen: frozenset, settle: float, interval: float, stop: threading.Event) -> frozenset | None:
    """Wait until the folder has not changed for ``settle`` seconds; None if asked to stop."""
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < settle:
        if stop.wait(min(interval, settle)):
            return None
        now = tree_signature(root)
        if now != seen:
            seen, quiet_since = now, time.monotonic()
    return seen


def _run_once(run: Callable[[], None], log: Callable[[str], None]) -> None:
    started = time.perf_counter()
    try:
        run()
    except UserError as e:
        log(f"Not retrained: {e}")
        return
    log(f"Retrained in {time.perf_counter() - started:.1f} s")
