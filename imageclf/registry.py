"""The set of served models, kept in step with a graphs folder.

A background thread polls the folder (about once a second). A new or changed ``*.pb`` (or its
``.json`` settings) is loaded, warmed up with one inference and then swapped in under a lock;
requests that already hold the old model finish on it. A graph that fails to load leaves the
previous version serving and records the error; a removed graph stops being served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imageclf.errors import UserError
from imageclf.graph_model import GraphModel

log = logging.getLogger(__name__)


class UnknownModelError(LookupError):
    pass


@dataclass
class ModelEntry:
    name: str
    path: Path
    model: GraphModel | None = None
    state: str = "loading"  # loading | ready | failed
    error: str | None = None
    loaded_at: float | None = None
    load_seconds: float | None = None
    signature: tuple = field(default=(), repr=False)

    @property
    def modified(self) -> int:
        """The graph file's modification time, in seconds."""
        return int(self.signature[0] // 1_000_000_000) if self.signature else 0

    @property
    def version(self) -> int | None:
        """Our graphs carry a version; for others the file's modification time stands in."""
        if self.model is None:
            return None
        return int((self.model.metadata or {}).get("version") or self.modified)

    def describe(self) -> dict:
        model = self.model
        return {
            "name": self.name, "state": self.state, "version": self.version, "path": str(self.path),
            "last_error": self.error, "loaded_at": self.loaded_at, "load_seconds": self.load_seconds,
            "labels": model.labels if model else None,
            "input_size": list(model.input_size) if model else None,
            "metadata": model.metadata if model else None,
        }


class ModelRegistry:
    def __init__(self, graphs_dir: str | Path, poll_seconds: float = 1.0):
        self.graphs_dir = Path(graphs_dir)
        self.poll_seconds = poll_seconds
        self._listeners: list[Callable[[str, bool], None]] = []
        self._entries: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading ----------------------------------------------------------------------

    def get(self, name: str | None = None) -> tuple[ModelEntry, GraphModel]:
        """The entry and its current model; ``None`` picks the only (or newest) ready model."""
        with self._lock:
            ready = {n: e for n, e in self._entries.items() if e.model is not None}
            if name is None:
                if not ready:
                    raise UnknownModelError("no model is loaded yet")
                entry = max(ready.values(), key=lambda e: (e.modified, e.name))
            elif name in ready:
                entry = ready[name]
            else:
                known = ", ".join(sorted(ready)) or "none"
                raise UnknownModelError(f"unknown model '{name}' (serving: {known})")
            return entry, entry.model

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.name)

    def ready(self) -> bool:
        return any(e.model is not None for e in self.entries())

    # -- keeping up with the folder -----------------------------------------------------

    def add_listener(self, listener: Callable[[str, bool], None]) -> None:
        """Call ``listener(model_name, ok)`` after every load attempt."""
        self._listeners.append(listener)

    def _notify(self, name: str, ok: bool) -> None:
        for listener in self._listeners:
            listener(name, ok)

    def start(self) -> None:
        self.scan()
        self._thread = threading.Thread(target=self._poll, name="model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.scan()
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad scan
                log.exception("scanning %s failed", self.graphs_dir)

    def scan(self) -> None:
        """Load new or changed graphs, forget removed ones."""
        found = {p.stem: p for p in sorted(self.graphs_dir.glob("*.pb")) if p.is_file()}
        with self._lock:
            for name in set(self._entries) - set(found):
                log.info("model %s removed", name)
                del self._entries[name]
        for name, path in found.items():
            signature = _signature(path)
            with self._lock:
                entry = self._entries.get(name)
            if entry is None or entry.signature != signature:
                self._load(name, path, signature, entry)

    def _load(self, name: str, path: Path, signature: tuple, previous: ModelEntry | None) -> None:
        started = time.perf_counter()
        try:
            model = GraphModel(path)
            model.predict([np.full((*model.input_size, 3), 128, np.uint8)])  # warm-up
        except (UserError, Exception) as e:  # noqa: BLE001 - any broken graph is reported, never fatal
            message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            log.warning("model %s failed to load: %s", name, message)
            with self._lock:
                entry = previous or ModelEntry(name=name, path=path)
                entry.state = "ready" if entry.model is not None else "failed"
                entry.error = message
                entry.signature = signature
                self._entries[name] = entry
            self._notify(name, False)
            return
        entry = ModelEntry(name=name, path=path, model=model, state="ready", loaded_at=time.time(),
                           load_seconds=round(time.perf_counter() - started, 3), signature=signature)
        with self._lock:
            self._entries[name] = entry  # the swap: new requests get the new model from here on
        log.info("model %s loaded in %.2f s", name, entry.load_seconds)
        self._notify(name, True)


def _signature(graph: Path) -> tuple:
    parts = []
    for path in (graph, graph.with_suffix(".json")):
        try:
            st = path.stat()
            parts.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except FileNotFoundError:
            parts.append(None)
    return (parts[0][0] if parts[0] else 0, *parts)
