"""Models served by a gRPC backend, as the engine sees them: the ``--backend`` client mode.

``RemoteRegistry`` stands where the local ``ModelRegistry`` stands (``acquire``, ``statuses``,
``ready``), so the engine, and through it every route, work unchanged: images are opened,
bounded and decoded here by the one preprocessing (EXIF, HEIC, JPEG draft scaling, the pixel
limit and the decode budget), resized to the model's input size, and sent as float32 pixels to
the backend's ``predict_images`` signature; concurrent requests share one call, as they share one
``Session.run`` locally. The backend answers the scores, the labels (``classes``) and the version.

Each model's input size and tensor names come from GetModelMetadata, and its labels from one
warm-up call, when the model is first seen and again whenever the backend serves a new version.
A poller asks GetModelStatus about every model about once a second: readiness is "every model is
AVAILABLE on the backend". A request never waits for the poller: it calls the backend, and the
backend's answer (or failure) is the answer; only while the last poll could not reach the backend
at all is a request answered 503 at once, without a call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from imageclf.engine.backend import (
    BackendBusyError,
    BackendClient,
    BackendFailedError,
    BackendRejectedError,
    BackendTimeoutError,
    BackendUnavailableError,
    BackendUnreachableError,
    ModelSignature,
    Prediction,
)
from imageclf.engine.backend_config import BackendOptions
from imageclf.engine.batching import BatchFailedError, MicroBatcher
from imageclf.engine.registry import UnknownModelError
from imageclf.engine.servable import BatchOptions
from imageclf.errors import BusyError, ServingError, UnavailableError
from imageclf.preprocess import image_to_model_input

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorName:
    """A tensor of the backend's model, known by name only (its SignatureDef's TensorInfo.name)."""

    name: str


@dataclass(frozen=True)
class RemoteModel:
    """What the engine and the routes read of a model (GraphModel's attributes), for a backend's model.

    The backend's ``predict_images`` takes pixels in [0, 1], so the scaling is the identity
    (mean 0, std 255), whatever the backend does inside.
    """

    input_size: tuple[int, int]
    labels: list[str]
    input: TensorName
    output: TensorName
    bytes_input: TensorName | None
    metadata: dict
    input_mean: float = 0.0
    input_std: float = 255.0

    def model_input(self, pixels: np.ndarray) -> np.ndarray:
        """Decoded RGB uint8 ``[h, w, 3]`` -> float32 ``[H, W, 3]`` in [0, 1], as for a local graph.

        The antialiased resize can land a hair above 1.0 in float32 (1.0000011 seen on white
        pixels); the backend may refuse values outside [0, 1], so they are clipped (a change
        far below what moves a score).
        """
        return np.clip(image_to_model_input(pixels, self.input_size), 0.0, 1.0)

    @property
    def bytes_input_name(self) -> str | None:
        return self.bytes_input.name if self.bytes_input is not None else None

    @property
    def input_name(self) -> str:
        return self.input.name

    @property
    def output_name(self) -> str:
        return self.output.name


@dataclass(frozen=True)
class _Row:
    scores: np.ndarray
    labels: tuple[str, ...]
    version: int


@dataclass(eq=False)
class RemoteVersion:
    """One version of a backend's model: its signature, labels and the batcher that calls Predict."""

    name: str
    version: int
    model: RemoteModel
    batcher: MicroBatcher
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    status_version: int | None = None   # the version GetModelStatus gave when it was fetched

    def covers(self, version: int) -> bool:
        """Whether this is the backend's ``version`` (as answers or as the status poll call it): a
        backend whose status and answers disagree is then not fetched again at every poll."""
        return version in (self.version, self.status_version)


class RemoteServable:
    """One request's hold on a backend's model (what the engine needs of a Servable).

    Made per request: the version and labels it reports are those of the backend's answer to
    this request, which may be newer than the metadata it was acquired with.
    """

    name: str
    version: int
    model: RemoteModel
    labels: list[str]

    def __init__(self, served: RemoteVersion, registry: RemoteRegistry):
        self._served, self._registry = served, registry
        self.name, self.version, self.model = served.name, served.version, served.model
        self.labels: list[str] = list(served.model.labels)

    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        """Nothing to free: the backend owns the model."""

    def predict(self, model_inputs: list[np.ndarray]) -> list[np.ndarray]:
        try:
            rows: list[_Row] = self._served.batcher.submit_many(model_inputs)
        except BatchFailedError as e:
            cause = e.__cause__
            if isinstance(cause, BackendRejectedError):
                # The pixels were made to the backend's own metadata, so the refusal is not the
                # client's fault: most likely the backend now serves a model of another input size.
                self._registry.forget(self._served)
                raise BackendUnavailableError("the model backend refused pixels of the input size its metadata "
                                              "gave; that metadata is fetched again; retry shortly") from None
            if isinstance(cause, ServingError):  # each request gets its own error, as its own status
                raise type(cause)(str(cause)) from None
            raise
        answered = {(row.version, row.labels) for row in rows}
        if len(answered) > 1:
            raise BackendUnavailableError("the backend changed the model's version during this request; retry")
        self.version, labels = answered.pop()
        self.labels = list(labels)
        if self.version != self._served.version:
            self._registry.recheck()
        return [row.scores for row in rows]


@dataclass
class RemoteStatus:
    """What the front knows of one backend model (the fields ModelStatus has, and ``describe``)."""

    name: str
    served: RemoteVersion | None        # set only while the backend says the model is AVAILABLE
    state: str                          # ready | loading | unavailable | failed
    error: str | None
    checked_at: float | None

    def describe(self) -> dict:
        s = self.served
        return {"name": self.name, "file": None, "backend": True, "runtime": "backend", "state": self.state,
                "version": s.version if s else None, "last_error": self.error,
                "loaded_at": s.loaded_at if s else None, "load_seconds": s.load_seconds if s else None,
                "labels": s.model.labels if s else None, "input_size": list(s.model.input_size) if s else None,
                "metadata": s.model.metadata if s else None, "checked_at": self.checked_at}


@dataclass(eq=False)
class _Model:
    name: str
    served: RemoteVersion | None = None     # the newest version seen; kept while the backend is away
    state: str = "loading"                  # until the backend has been asked
    error: str | None = None
    checked_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # one metadata fetch at a time
    fetches: int = 0                        # metadata fetches finished (under ``lock``)
    fetch_error: ServingError | None = None  # why the last one failed, for those that waited for it
    down: bool = False                      # the last status poll could not reach the backend


class RemoteRegistry:
    """The models ``models`` (the first is the default) of the backend behind ``client``."""

    def __init__(self, client: BackendClient, models: Sequence[str], batching: BatchOptions | None = None,
                 poll_seconds: float = 1.0):
        if not models:
            raise ValueError("name at least one model of the backend")
        self.client = client
        self.default = models[0]
        self.poll_seconds = poll_seconds
        self._batching = batching or BatchOptions()
        self._models = {name: _Model(name) for name in models}
        self._listeners: list[Callable[[str, bool], None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what the engine and the routes use ---------------------------------------------

    def acquire(self, name: str | None = None, version: int | None = None) -> RemoteServable:
        """The backend's served version of ``name``. The backend keeps its own versions: whether it is
        ``version`` is known only from its answer, and the engine checks that."""
        model = self._models.get(name or self.default)
        if model is None:
            raise UnknownModelError(f"unknown model '{name}' (serving: {', '.join(self._models)})")
        if model.down:
            # Known unreachable or hung: answered now, rather than every request thread waiting out
            # the deadline to learn it again (which would leave none for /healthz). The poller
            # clears this as soon as the backend answers it.
            raise BackendUnavailableError(model.error or "the model backend is unavailable; retry shortly")
        served = model.served or self._fetch(model)
        return RemoteServable(served, self)

    def forget(self, served: RemoteVersion) -> None:
        """Drop ``served`` (the backend refused requests made to its metadata): fetch it again."""
        model = self._models[served.name]
        with self._lock:
            if model.served is served:
                model.served, model.state = None, "loading"
        self._wake.set()

    def statuses(self) -> list[RemoteStatus]:
        with self._lock:
            return [RemoteStatus(m.name, m.served if m.state == "ready" else None, m.state, m.error, m.checked_at)
                    for m in self._models.values()]

    def ready(self) -> bool:
        with self._lock:
            return all(m.state == "ready" and m.served is not None for m in self._models.values())

    def not_ready_reason(self) -> str:
        waiting = [f"{s.name}: {s.error or s.state}" for s in self.statuses() if s.served is None]
        return "the backend does not serve every model yet (" + "; ".join(waiting) + ")"

    def add_listener(self, listener: Callable[[str, bool], None]) -> None:
        """Call ``listener(model_name, ok)`` after every metadata fetch (a version first seen)."""
        self._listeners.append(listener)

    def recheck(self) -> None:
        """Ask the poller to look at the backend now (a new version was seen, or a request refused)."""
        self._wake.set()

    # -- keeping up with the backend ----------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._poll, name="backend-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and close the channel (calls still running fail as CANCELLED)."""
        self._stop.set()
        self._wake.set()
        self.client.close()  # first: a status call the poller waits on ends now, not at its deadline
        if self._thread:
            self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            for model in self._models.values():
                if self._stop.is_set():
                    return
                try:
                    self.check(model.name)
                except Exception:  # noqa: BLE001 - the poller must outlive any one bad answer
                    log.exception("checking model %s on the backend failed", model.name)
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def check(self, name: str) -> None:
        """Ask the backend about ``name``; fetch its metadata when it serves a version not seen yet."""
        model = self._models[name]
        try:
            state = self.client.status(name)
        except ServingError as e:
            self._set(model, _state_of(e), str(e))
            # Only unreachable or hung: a backend that refuses a poll because it is busy
            # (RESOURCE_EXHAUSTED) may still answer requests.
            model.down = isinstance(e, BackendUnreachableError | BackendTimeoutError)
            return
        model.down = False
        if not state.available:
            self._set(model, state.state, state.error)
            return
        if model.served is None or not model.served.covers(state.version):
            try:
                self._fetch(model, state.version)
            except ServingError:
                return  # _fetch recorded the error
        self._set(model, "ready", None)

    def _set(self, model: _Model, state: str, error: str | None) -> None:
        with self._lock:
            model.state, model.error, model.checked_at = state, error, time.time()

    def _fetch(self, model: _Model, expected_version: int | None = None) -> RemoteVersion:
        """Metadata and labels of the version the backend serves now, swapped in for new requests."""
        fetches = model.fetches
        # One fetch takes at most two calls, each a slot wait and a deadline; more would mean a pile-up.
        if not model.lock.acquire(timeout=4 * self.client.timeout_s + 1):
            raise BackendBusyError(f"model '{model.name}' is still being fetched from the backend; retry shortly")
        try:
            current = model.served
            if current is not None and (expected_version is None or current.covers(expected_version)):
                return current  # another request or the poller fetched it meanwhile
            if model.fetches != fetches and model.fetch_error is not None:
                # A fetch failed while this one waited: its answer is this one's too, rather than
                # each waiting request asking a slow backend again in turn.
                raise type(model.fetch_error)(str(model.fetch_error))
            started = time.perf_counter()
            try:
                served = self._load(model.name, self.client.signature(model.name), started)
            except ServingError as e:
                model.fetches += 1
                if isinstance(e, BackendRejectedError):  # a refusal of what the front made to the metadata
                    e = BackendFailedError(f"model '{model.name}' on the backend refuses a picture of the input "
                                           f"size its metadata declares: {e}")
                model.fetch_error = e
                self._set(model, _state_of(e), str(e))
                self._notify(model.name, False)
                raise e from None
            model.fetches, model.fetch_error = model.fetches + 1, None
            served.status_version = expected_version
            with self._lock:
                model.served = served
            log.info("backend model %s version %s: input %dx%d, %d labels", model.name, served.version,
                     *served.model.input_size, len(served.model.labels))
            self._notify(model.name, True)
            return served
        finally:
            model.lock.release()

    def _load(self, name: str, signature: ModelSignature, started: float) -> RemoteVersion:
        # One call with a gray picture tells the labels (and proves the signature works end to end).
        warm = self.client.predict(name, np.full((1, *signature.input_size, 3), 0.5, np.float32))
        options = self._batching
        per_call = min(options.max_batch, self.client.images_per_call(signature.input_size),
                       self.client.rows_per_answer(warm.labels))
        batcher = MicroBatcher(self._caller(name), per_call, options.max_wait_ms / 1000, options.timeout_s)
        model = RemoteModel(input_size=signature.input_size, labels=list(warm.labels),
                            input=TensorName(signature.input_name), output=TensorName(signature.output_name),
                            bytes_input=TensorName(signature.bytes_input_name) if signature.bytes_input_name else None,
                            metadata={"backend_signature": "predict_images", "input_size": list(signature.input_size),
                                      "labels": list(warm.labels)})
        return RemoteVersion(name=name, version=warm.version or signature.version, model=model, batcher=batcher,
                             load_seconds=round(time.perf_counter() - started, 3))

    def _caller(self, name: str) -> Callable[[list[np.ndarray]], list[_Row]]:
        def run(inputs: list[np.ndarray]) -> list[_Row]:
            answer: Prediction = self.client.predict(name, np.stack(inputs))
            return [_Row(row, answer.labels, answer.version) for row in answer.scores]
        return run

    def _notify(self, name: str, ok: bool) -> None:
        for listener in self._listeners:
            listener(name, ok)


def _state_of(error: ServingError) -> str:
    """A model's state after a failed call: "unavailable" when a retry may succeed, "failed" otherwise."""
    return "unavailable" if isinstance(error, UnavailableError | BusyError) else "failed"


def remote_registry(options: BackendOptions, batching: BatchOptions,
                    on_call: Callable[[str, str, float], None] | None = None) -> RemoteRegistry:
    """A RemoteRegistry over one channel to ``options.url`` (not started; call ``start()``)."""
    client = BackendClient(options.target, timeout_s=options.timeout_s,
                           max_calls=options.max_calls, on_call=on_call)
    # A request that joins a batch led by another waits for that call: a slot, then the deadline, so
    # no longer than that; and never longer than --batch_timeout_s, which bounds the wait as it does
    # for a local model (before, it was replaced by this bound, and silently ignored).
    batching = replace(batching, timeout_s=min(batching.timeout_s, 2 * options.timeout_s + 1))
    return RemoteRegistry(client, options.models, batching, options.poll_seconds)
