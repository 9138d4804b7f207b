"""Which requests the server takes on, decided in its event loop before a request thread is spent.

Waitress reads whole requests in one event-loop thread and queues them for ``--threads``
request threads; its queue has no bound, so under more load than the threads can serve every
request waits behind every other, health probes included. Here each completed request is sorted
before it is queued, in the manner of TensorFlow Serving's bounded batch queue
(``max_enqueued_batches``):

- probes (``/healthz``, ``/readyz`` and the Open Inference Protocol's ``/v2/health/*``) and
  error answers are answered at once in the event loop: they never wait behind model work;
- model work (uploads, ``?file=``, ``:predict``...) joins the queue only while fewer than
  ``max_queued`` requests wait there; beyond that it is answered 503 with ``Retry-After`` at once;
- everything else (``/models``, ``/metrics``, metadata, the page) goes to the front of the queue.
"""

from __future__ import annotations

import enum

PROBE_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
MODEL_WORK_METHODS = frozenset({"POST", "PUT", "PATCH"})


class Route(enum.Enum):
    INLINE = "inline"    # answered in the event loop (probes, errors, refusals)
    FRONT = "front"      # cheap: ahead of model work in the queue
    QUEUE = "queue"      # model work, admitted
    SHED = "shed"        # model work over the bound: 503 + Retry-After


def is_model_work(method: str, path: str, query: str) -> bool:
    """Requests that run the model (or a decoder): they are what a full service refuses."""
    if method in MODEL_WORK_METHODS:
        return True
    return path == "/" and any(part.split("=", 1)[0] == "file" for part in query.split("&"))


class Admission:
    """Sorts completed requests (waitress parsers) by ``Route`` (the server counts what it refuses)."""

    def __init__(self, max_queued: int):
        if max_queued < 0:
            raise ValueError("max_queued must not be negative")
        self.max_queued = max_queued

    def route(self, request, waiting: int) -> Route:
        """Where ``request`` goes if, with it, ``waiting`` requests would wait for a thread."""
        if request.error is not None:
            return Route.INLINE
        method = request.command
        if method in ("GET", "HEAD") and request.path in PROBE_PATHS:
            return Route.INLINE
        if not is_model_work(method, request.path, request.query):
            return Route.FRONT
        if waiting > self.max_queued:
            return Route.SHED
        return Route.QUEUE
