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
import socket
import threading
import time

import waitress
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

log = logging.getLogger(__name__)


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
                  connection_limit: int = 1000, channel_timeout: int = 30, listen_socket=None, **adjustments):
    """A waitress server for ``app``, not yet running (call ``.run()``).

    ``listen_socket``: accept on this already listening socket (a ``--workers`` child shares its
    parent's) instead of binding ``host:port``.
    """
    where = {"sockets": [listen_socket]} if listen_socket is not None else {"host": host, "port": port}
    _raise_open_files_limit(connection_limit + threads + 64)
    # The per-request "Task queue depth" warning floods logs under load; real trouble is counted in /metrics.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    server = waitress.create_server(
        app, **where, threads=threads, max_request_body_size=max_request_body_size,
        connection_limit=connection_limit, channel_timeout=channel_timeout,
        cleanup_interval=max(1, min(channel_timeout // 2, 30)), ident="imageclf",
        asyncore_use_poll=True,  # select() cannot watch more than 1,024 sockets
        # Reads of 64 KiB, not 8: a 3 MB phone photo took 5 ms less to receive (one buffer at a
        # time, in the event loop; a slow client still costs only what it has sent).
        recv_bytes=64 * 1024,
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


def _unread_input(channel: HTTPChannel) -> bool:
    """Whether the client's bytes wait in the socket unread: a request sent just before the stop that
    the loop has not read yet (the stop was noticed first, or the channel was still writing its
    previous answer, when waitress reads nothing). Closing such a channel would reset the client."""
    try:
        return bool(channel.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing to read (EAGAIN), or the connection is gone
        return False


def serve_until(server, stop: threading.Event, grace_s: float = 5.0) -> None:
    """Run ``server`` until ``stop`` is set, then shut it down gracefully, and return.

    Shutting down: the listening socket is closed (new connections are refused), requests being
    received or handled go on for up to ``grace_s`` seconds and their answers are sent, idle
    keep-alive connections are closed, then the request threads stop. Waitress' own shutdown
    stops its event loop at once, so answers still being written would be lost. Set ``stop``
    from a signal handler; call ``server.pull_trigger()`` too, to wake the loop at once.
    """
    adj = server.adj
    channels = server._map  # noqa: SLF001 - waitress keeps its socket map there (BaseWSGIServer)

    def turn(timeout: float) -> None:
        wasyncore.loop(timeout=timeout, map=channels, use_poll=adj.asyncore_use_poll, count=1)

    while not stop.is_set():
        turn(adj.asyncore_loop_timeout)
    wasyncore.dispatcher.close(server)  # the listener only: the loop's trigger must keep working
    deadline = time.monotonic() + grace_s
    while True:
        open_channels = [c for c in list(channels.values()) if isinstance(c, HTTPChannel)]
        busy = [c for c in open_channels
                if c.requests or c.request is not None or c.total_outbufs_len or _unread_input(c)]
        for channel in open_channels:
            if channel not in busy:
                channel.will_close = True  # closed by the loop; the client reconnects elsewhere
        if not busy or time.monotonic() >= deadline:
            break
        turn(0.05)
    if busy:
        log.warning("shutting down with %d request(s) unfinished after %g s", len(busy), grace_s)
    turn(0)  # close the idle connections marked above
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=max(0.1, deadline - time.monotonic()))
    wasyncore.close_all(channels)
