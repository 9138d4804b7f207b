"""Prometheus metrics of one service instance."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from imageclf.engine.budget import MemoryBudget


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("imageclf_requests_total",
                                "Requests answered: HTTP by route and status, gRPC by method and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("imageclf_request_seconds", "Time to answer a request", ["endpoint"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.errors = Counter("imageclf_errors_total", "Requests answered with an error, by kind",
                              ["kind"], registry=self.registry)
        self.reloads = Counter("imageclf_model_reloads_total", "Model (re)loads, by result",
                               ["model", "result"], registry=self.registry)
        self.backend_calls = Counter("imageclf_backend_calls_total",
                                     "Calls to the --backend, by method and gRPC status code",
                                     ["method", "code"], registry=self.registry)
        self.backend_latency = Histogram("imageclf_backend_call_seconds", "Time of a call to the --backend",
                                         ["method"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                         registry=self.registry)

        self.http_refused = Counter("imageclf_http_refused_total",
                                    "Requests or connections the HTTP server refused before the app saw them, by "
                                    "reason (queue_full, client_connections, body_buffers_full, head_deadline, "
                                    "body_deadline)", ["reason"], registry=self.registry)

    def refused(self, reason: str) -> None:
        self.http_refused.labels(reason).inc()

    def watch_server(self, server) -> None:
        """Export the HTTP server's queue and buffers (a service.server.GuardedServer)."""
        for name, doc, read in (
                ("imageclf_http_queued_requests", "Requests waiting for a request thread",
                 lambda: server.task_dispatcher.queued),
                ("imageclf_http_max_queued_requests", "Model requests that may wait before more are refused",
                 lambda: server.admission.max_queued),
                ("imageclf_http_open_connections", "Open HTTP connections", lambda: len(server.active_channels)),
                ("imageclf_http_buffered_body_bytes", "Request body bytes received and not yet answered",
                 lambda: server.buffers.used)):
            Gauge(name, doc, registry=self.registry).set_function(read)

    def set_worker(self, index: int) -> None:
        """Under --workers, /metrics answers for one worker process: say which (and its pid)."""
        Gauge("imageclf_worker", "This worker of a --workers service (1): its index and pid", ["worker", "pid"],
              registry=self.registry).labels(str(index), str(os.getpid())).set(1)

    def reloaded(self, model: str, ok: bool) -> None:
        self.reloads.labels(model, "ok" if ok else "failed").inc()

    def backend_call(self, method: str, code: str, seconds: float) -> None:
        self.backend_calls.labels(method, code).inc()
        self.backend_latency.labels(method).observe(seconds)

    def watch_budget(self, budget: MemoryBudget) -> None:
        """Export the decode budget's use, now and at its peak."""
        for name, doc, read in (("imageclf_decode_budget_bytes", "Decode memory budget", lambda: budget.capacity),
                                ("imageclf_decode_reserved_bytes", "Decode memory reserved now", lambda: budget.used),
                                ("imageclf_decode_reserved_peak_bytes", "Most decode memory reserved at once",
                                 lambda: budget.peak)):
            Gauge(name, doc, registry=self.registry).set_function(read)
