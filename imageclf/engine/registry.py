"""The set of served models, kept in step with a graphs folder.

A background thread polls the folder (about once a second): the *source*. A new or changed
``*.pb`` (or its ``.json`` settings) is loaded, checked and warmed up beside the version being
served, then swapped in under a lock; requests that already hold the old version finish on it,
and the old version is closed when the last of them releases it (see servable.py). A graph
that fails to load changes nothing that is served: the previous version, its number and the
choice of default model stay as they were, and the error is shown. A removed graph stops
being served. A change of the ``.json`` alone reloads nothing when the served graph
describes itself (ours take nothing from it).

Pinned versions (TF Serving's "specific" version policy): ``keep_versions={"dogs": {3, 4}}``
also keeps versions 3 and 4 of ``dogs`` loaded, from the history retrain keeps
(``graphs/history/dogs/<version>/dogs.pb``, see imageclf/history.py), beside the served latest.
Route code reaches one with ``acquire(name, version=V)`` (and ``release()``)
(Engine.hold(name, version) does so): the served version if it is V, else the pinned V, else
UnknownVersionError (a 404). A pinned version whose folder disappears (pruned) is retired.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imageclf.engine.servable import BatchOptions, Servable
from imageclf.errors import UserError, echo
from imageclf.history import version_dir
from imageclf.runtimes import RuntimeOptions

log = logging.getLogger(__name__)


class UnknownModelError(LookupError):
    """No model of that name is being served (others are)."""


class NoModelError(LookupError):
    """No model is being served at all (yet)."""


class UnknownVersionError(LookupError):
    """The model is served, but the version asked for is neither the served one nor a pinned one."""


@dataclass
class PinnedVersion:
    """A version kept loaded on request (``--keep_versions NAME=V``), beside the served one."""

    version: int
    served: Servable | None = None
    state: str = "missing"      # missing (no such kept version on disk) | ready | failed
    error: str | None = None

    def describe(self) -> dict:
        return {"version": self.version, "state": self.state, "last_error": self.error}


@dataclass
class ModelStatus:
    """What the registry knows of one name: the served version and the last load attempt."""

    name: str
    file: str
    served: Servable | None = None
    state: str = "loading"          # loading | ready | failed
    error: str | None = None        # the last load's error, if it failed
    seen: tuple = ()                # the files' signature at the last load attempt
    pinned: list[dict] = field(default_factory=list)  # PinnedVersion.describe() of each pinned version

    def describe(self) -> dict:
        s = self.served
        model = s.model if s else None
        data = ((model.metadata or {}).get("data") or {}) if model else {}
        return {
            "name": self.name, "file": self.file, "state": self.state,
            "version": s.version if s else None, "last_error": self.error,
            "data_fingerprint": data.get("fingerprint"), "pinned_versions": self.pinned,
            "loaded_at": s.loaded_at if s else None, "load_seconds": s.load_seconds if s else None,
            "runtime": model.runtime if model else None,
            "runtime_note": model.runtime_note if model else None,
            "labels": model.labels if model else None,
            "input_size": list(model.input_size) if model else None,
            "metadata": _public_metadata(model.metadata) if model else None,
        }


Loader = Callable[[str, Path], Servable]


class ModelRegistry:
    def __init__(self, graphs_dir: str | Path, poll_seconds: float = 1.0,
                 batching: BatchOptions | None = None, loader: Loader | None = None,
                 runtime: RuntimeOptions | None = None, keep_versions: dict[str, set[int]] | None = None):
        self.graphs_dir = Path(graphs_dir)
        self._pinned = {(name, v): PinnedVersion(v) for name, versions in (keep_versions or {}).items()
                        for v in sorted(versions)}
        self.poll_seconds = poll_seconds
        options = batching or BatchOptions()
        self._loader = loader or (lambda name, path: Servable.load(name, path, options, runtime=runtime))
        self._listeners: list[Callable[[str, bool], None]] = []
        self._models: dict[str, ModelStatus] = {}
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()  # one scan at a time (the poller, or a caller)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- serving ------------------------------------------------------------------------

    def acquire(self, name: str | None = None, version: int | None = None) -> Servable:
        """Take a reference to the served version of ``name``; the caller must ``release()`` it.

        With ``version``: that version, the served one or a pinned one (see the module doc);
        UnknownVersionError when neither is it.
        """
        with self._lock:
            served = {n: m.served for n, m in self._models.items() if m.served is not None}
            if not served:
                raise NoModelError("no model is loaded yet")
            if name is None:
                servable = max(served.values(), key=lambda s: (s.modified_ns, s.name))
            elif name in served:
                servable = served[name]
            else:
                raise UnknownModelError(f"unknown model '{echo(name)}' (serving: {', '.join(sorted(served))})")
            if version is not None and servable.version != version:
                servable = self._pinned_servable(servable, version)
            # Under the registry's lock the registry's own reference is still held, so this succeeds.
            if not servable.acquire():
                raise NoModelError(f"model {servable.name} was just retired")
            return servable

    def _pinned_servable(self, served: Servable, version: int) -> Servable:
        pinned = self._pinned.get((served.name, version))
        if pinned is None or pinned.served is None:
            kept = sorted(v for (n, v), p in self._pinned.items() if n == served.name and p.served is not None)
            also = f", kept loaded: {', '.join(map(str, kept))}" if kept else ""
            raise UnknownVersionError(f"model {served.name} has no version {version} loaded (serving version "
                                      f"{served.version}{also}; keep one loaded with --keep_versions "
                                      f"{served.name}={version})")
        return pinned.served

    def statuses(self) -> list[ModelStatus]:
        with self._lock:
            return sorted(self._models.values(), key=lambda m: m.name)

    def ready(self) -> bool:
        with self._lock:
            return any(m.served is not None for m in self._models.values())

    def not_ready_reason(self) -> str:
        return "no model is loaded"

    # -- keeping up with the folder -----------------------------------------------------

    def add_listener(self, listener: Callable[[str, bool], None]) -> None:
        """Call ``listener(model_name, ok)`` after every load attempt."""
        self._listeners.append(listener)

    def start(self) -> None:
        self.scan()
        self._thread = threading.Thread(target=self._poll, name="model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and retire every served model."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        with self._lock:
            retired = [m.served for m in self._models.values() if m.served is not None]
            retired += [p.served for p in self._pinned.values() if p.served is not None]
            self._models.clear()
            for pinned in self._pinned.values():
                pinned.served, pinned.state = None, "missing"
        for servable in retired:
            servable.release()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.scan()
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad scan
                log.exception("scanning %s failed", self.graphs_dir)

    def scan(self) -> None:
        """Load new or changed graphs, retire removed ones."""
        with self._scan_lock:
            try:
                found = {p.stem: p for p in sorted(self.graphs_dir.glob("*.pb")) if p.is_file()}
            except OSError as e:
                log.warning("cannot list %s: %s", self.graphs_dir, e)
                return
            for name in set(self._models) - set(found):
                self._retire(name)
            for name, path in found.items():
                signature = _signature(path)
                with self._lock:
                    status = self._models.get(name)
                if status is None or status.seen != signature:
                    if status is not None and _only_settings_changed(status, signature):
                        with self._lock:
                            status.seen = signature
                    else:
                        self._load(name, path, signature)
            self._scan_pinned()

    def _scan_pinned(self) -> None:
        """Load pinned versions that appeared in the history, retire those that went (pruned)."""
        for (name, version), pinned in self._pinned.items():
            path = version_dir(self.graphs_dir, name, version) / f"{name}.pb"
            present = path.is_file()
            if present and pinned.state == "missing":
                self._load_pinned(name, path, pinned)
            elif not present and pinned.state != "missing":
                with self._lock:
                    retired, pinned.served, pinned.state, pinned.error = pinned.served, None, "missing", None
                if retired is not None:
                    log.info("model %s version %s (pinned) removed", name, version)
                    retired.release()
        with self._lock:
            for name, status in self._models.items():
                status.pinned = [p.describe() for (n, _), p in self._pinned.items() if n == name]

    def _load_pinned(self, name: str, path: Path, pinned: PinnedVersion) -> None:
        # Kept versions never change on disk: loaded once (a failed one is not retried until it goes away).
        try:
            servable = self._loader(name, path)
        except Exception as e:  # noqa: BLE001 - any broken graph is reported, never fatal
            message = self._public_message(e)
            log.warning("model %s version %s (pinned) failed to load: %s", name, pinned.version, message)
            with self._lock:
                pinned.state, pinned.error = "failed", message
            return
        if servable.version != pinned.version:
            servable.release()
            with self._lock:
                pinned.state, pinned.error = "failed", f"{path.name} there is version {servable.version}"
            return
        with self._lock:
            pinned.served, pinned.state, pinned.error = servable, "ready", None
        log.info("model %s version %s (pinned) loaded in %.2f s", name, servable.version, servable.load_seconds)

    def _retire(self, name: str) -> None:
        with self._lock:
            status = self._models.pop(name, None)
        if status is not None and status.served is not None:
            log.info("model %s removed", name)
            status.served.release()

    def _load(self, name: str, path: Path, signature: tuple) -> None:
        try:
            servable = self._loader(name, path)
        except Exception as e:  # noqa: BLE001 - any broken graph is reported, never fatal
            message = self._public_message(e)
            log.warning("model %s failed to load: %s", name, message)
            with self._lock:
                status = self._models.setdefault(name, ModelStatus(name=name, file=path.name))
                status.state = "ready" if status.served is not None else "failed"
                status.error, status.seen = message, signature
            self._notify(name, False)
            return
        with self._lock:
            status = self._models.setdefault(name, ModelStatus(name=name, file=path.name))
            previous, status.served = status.served, servable  # the swap: new requests get the new version
            status.state, status.error, status.seen = "ready", None, signature
        if previous is not None:
            previous.release()  # closed now, or when its last request finishes
        log.info("model %s version %s loaded in %.2f s", name, servable.version, servable.load_seconds)
        self._notify(name, True)

    def _public_message(self, error: Exception) -> str:
        """The error as users may see it: no absolute server paths, no traceback."""
        message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        for prefix in {str(self.graphs_dir.resolve()), str(self.graphs_dir.absolute()), str(self.graphs_dir)}:
            if prefix not in (".", ""):
                message = message.replace(prefix + "/", "")
        return message

    def _notify(self, name: str, ok: bool) -> None:
        for listener in self._listeners:
            listener(name, ok)


# An absolute path: "/" not preceded by a word character, ".", ":" or "/" (so URLs are left alone).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/\"']+/)*([^\s/\"']+)")


def _public_metadata(metadata: dict | None):
    """Metadata as clients may see it: absolute paths (a base model's folder...) cut to their last part,
    and the duplicate report as counts, without the names of the training files (those stay in the
    graph and in ``<name>.json``, for whoever retrains)."""
    if metadata is None:
        return None
    public = json.loads(_ABSOLUTE_PATH.sub(r"\1", json.dumps(metadata)))
    if isinstance(public.get("duplicates"), dict):
        public["duplicates"] = _counts_only(public["duplicates"])
    return public


def _counts_only(report: dict) -> dict:
    """``{"identical_groups": [[names...]], "identical_groups_total": 3, ...}`` -> the numbers alone; a list
    without its ``_total`` is counted (the metadata keeps at most 50 of each list)."""
    counts = {key: value for key, value in report.items() if not isinstance(value, list | dict)}
    for key, value in report.items():
        if isinstance(value, list | dict):
            counts.setdefault(f"{key}_total", len(value))
    return counts


def _only_settings_changed(status: ModelStatus, signature: tuple) -> bool:
    """Only the ``.json`` beside a served graph that describes itself changed: nothing to reload
    (such a graph takes nothing from it; retrain writes it just after the graph)."""
    served = status.served
    return (status.error is None and served is not None and served.model is not None
            and served.model.metadata is not None and status.seen[:1] == signature[:1])


def _signature(graph: Path) -> tuple:
    parts = []
    for path in (graph, graph.with_suffix(".json")):
        try:
            st = path.stat()
            parts.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            parts.append(None)
    return tuple(parts)
