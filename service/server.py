"""The waitress server: connection bounds, timeouts, and JSON for its own error answers.

Waitress reads whole requests in its event loop before a worker thread sees them, so slow or
half-finished requests cost a socket, not a thread. What bounds them is the number of
connections (``connection_limit``) and how long a silent connection is kept
(``channel_timeout``).
"""

from __future__ import annotations

import json
import logging
import resource

import waitress
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask


class JsonErrorTask(ErrorTask):
    """Waitress' own errors (bad Content-Length, 431, body too large...) as JSON like the app's."""

    def execute(self):
        error = self.request.error
        self.status = f"{error.code} {error.reason}"
        message = f"{error.reason}: {error.body}"
        if error.code == 413:
            message = f"request body is over the {self.channel.adj.max_request_body_size:,} byte limit"
        body = json.dumps({"error": message}).encode()
        self.response_headers.extend([("Content-Type", "application/json"),
                                      ("X-Content-Type-Options", "nosniff")])
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JsonErrorChannel(HTTPChannel):
    error_task_class = JsonErrorTask


def create_server(app, *, host: str, port: int, threads: int, max_request_body_size: int,
                  connection_limit: int = 1000, channel_timeout: int = 30, **adjustments):
    """A waitress server for ``app``, not yet running (call ``.run()``)."""
    _raise_open_files_limit(connection_limit + threads + 64)
    # The per-request "Task queue depth" warning floods logs under load; real trouble is counted in /metrics.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    server = waitress.create_server(
        app, host=host, port=port, threads=threads, max_request_body_size=max_request_body_size,
        connection_limit=connection_limit, channel_timeout=channel_timeout,
        cleanup_interval=max(1, min(channel_timeout // 2, 30)), ident="imageclf",
        asyncore_use_poll=True,  # select() cannot watch more than 1,024 sockets
        **adjustments)
    for listener in [server, *getattr(server, "map", {}).values()]:
        if hasattr(listener, "channel_class"):
            listener.channel_class = JsonErrorChannel
    return server


def _raise_open_files_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
