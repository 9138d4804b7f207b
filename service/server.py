"""The waitress server: bounded admission, connection limits, RFC framing, and JSON errors.

Waitress reads whole requests in its event loop before a request thread sees them, so slow or
half-finished requests cost a socket, not a thread. On top of waitress this server adds what a
service needs under more load than it can serve (see docs/serving.md, "Under load"):

- admission (service/admission.py): probes and error answers never wait for a thread, model
  work beyond ``max_queued_requests`` waiting is refused at once (503 + Retry-After), cheap
  requests go ahead of model work;
- connections (service/connections.py): a cap per client address (proxies exempt), a budget on
  buffered request bodies, deadlines for a whole head and a whole body;
- framing (service/framing.py): RFC 9112's rules against request smuggling;
- the listening socket is bound before anything slow happens, so "port in use" is one line.
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from service.admission import Admission, Route
from service.connections import BufferBudget, ClientConnections, Deadlines
from service.framing import RequestTimeout, ServiceBusy, Stalled, StrictRequestParser

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
LINGER_S = 2.0  # how long input is drained after an answer that closes the connection
DEFAULT_MAX_BUFFERED_BYTES = 256 << 20


class JsonErrorTask(ErrorTask):
    """Waitress' own errors (bad framing, 431, body too large, refusals for load) as JSON like the app's."""

    def execute(self):
        error = self.request.error
        self.status = f"{error.code} {error.reason}"
        message = f"{error.reason}: {error.body}"
        if error.code == 413:
            message = f"request body is over the {self.channel.adj.max_request_body_size:,} byte limit"
        body = json.dumps({"error": message}).encode()
        self.response_headers.extend([("Content-Type", "application/json"),
                                      ("X-Content-Type-Options", "nosniff")])
        if error.code == 503:
            self.response_headers.append(("Retry-After", str(RETRY_AFTER_S)))
        if not getattr(self.request, "body_was_read", False):
            self.set_close_on_finish()  # where the next request starts is unknown, or the body is unread
        self.content_length = len(body)
        self.write(body)


class GuardedDispatcher(ThreadedTaskDispatcher):
    """Waitress' thread pool, with a front of the queue for cheap requests and no queue-depth warnings."""

    def add_task(self, task, front: bool = False) -> None:
        with self.lock:
            if front:
                self.queue.appendleft(task)
            else:
                self.queue.append(task)
            self.queue_cv.notify()

    @property
    def queued(self) -> int:
        return len(self.queue)

    def waiting_with_one_more(self) -> int:
        """How many requests would wait for a thread if one more were queued now (idle threads take some)."""
        idle = len(self.threads) - self.stop_count - self.active_count
        return max(0, len(self.queue) + 1 - idle)


class GuardedChannel(HTTPChannel):
    """A connection whose probes, errors and refusals are answered in the event loop (see run_inline)."""

    error_task_class = JsonErrorTask
    parser_class = StrictRequestParser
    inline_pending = False
    lingering_until: float | None = None

    def __init__(self, server, sock, addr, adj, map=None):
        self._inline_lock = threading.Lock()
        self._counted = True
        super().__init__(server, sock, addr, adj, map=map)

    def received(self, data):
        result = super().received(data)
        self.run_inline()
        return result

    def service(self):
        super().service()
        self.server.task_finished()
        self.run_inline()

    def run_inline(self) -> None:
        """Answer the request that admission marked for the event loop, in the calling thread.

        Marked while waitress holds the channel's request lock (it queues a request there), so
        run just after, by whichever thread queued it; the lock keeps two threads from serving
        one connection, and the flag is looked at again after every release so none is missed.
        """
        while self.inline_pending:
            if not self._inline_lock.acquire(blocking=False):
                return  # another thread is in the loop below and will see the flag
            try:
                while self.inline_pending:
                    self.inline_pending = False
                    HTTPChannel.service(self)
            finally:
                self._inline_lock.release()

    # -- lingering close: an answer sent before the whole request was read must reach the client.
    # Closing a socket with unread input makes the kernel send a reset, and a client still sending
    # (a trickling head, a body the service refused) may then lose the answer it had not read yet.
    # So after such an answer the write side is shut (the client reads the answer, then EOF) and
    # whatever still comes is read and dropped, for at most LINGER_S, before the socket is closed.

    def handle_write(self):
        if self.close_when_flushed and not self.total_outbufs_len and self.lingering_until is None:
            if self._start_lingering():
                return
        super().handle_write()

    def _start_lingering(self) -> bool:
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        self.close_when_flushed = False
        self.lingering_until = time.monotonic() + LINGER_S
        return True

    # The event loop asks every open connection these two at every turn: with hundreds of idle
    # keep-alive connections that is the loop's main cost, so they are waitress' tests written out
    # (no super() call) plus the lingering state.
    def readable(self):
        if self.lingering_until is not None:
            return True
        return not (self.will_close or self.close_when_flushed or self.total_outbufs_len
                    or len(self.requests) > self.adj.channel_request_lookahead)

    def writable(self):
        if self.lingering_until is not None:
            return False
        return bool(self.total_outbufs_len or self.will_close or self.close_when_flushed)

    def handle_read(self):
        if self.lingering_until is None:
            return super().handle_read()
        try:
            data = self.socket.recv(self.adj.recv_bytes)
        except OSError:
            data = b""
        if not data or time.monotonic() > self.lingering_until:
            self.handle_close()

    def handle_close(self):
        partial, self.request = self.request, None
        if partial is not None:
            partial.close()  # its buffered body and its reservation
        super().handle_close()

    def del_channel(self, map=None):
        super().del_channel(map)
        if self._counted:
            self._counted = False
            self.server.clients.release(self.addr[0])


class GuardedServer(TcpWSGIServer):
    """One listening socket served by ``GuardedChannel`` connections (made by ``create_server``)."""

    def __init__(self, app, sock: socket.socket, adj: Adjustments, *, admission: Admission,
                 clients: ClientConnections, buffers: BufferBudget, deadlines: Deadlines,
                 on_refused: Callable[[str], None] | None = None, stall_after_s: float = 120.0):
        self.admission, self.clients, self.buffers, self.deadlines = admission, clients, buffers, deadlines
        self.refused: Counter[str] = Counter()
        self._on_refused = on_refused
        self.stall_after_s = stall_after_s
        self.last_finished = time.monotonic()
        parser = type("Parser", (StrictRequestParser,), {"reserve_body": staticmethod(self._reserve_body)})
        self.channel_class = type("Channel", (GuardedChannel,), {"parser_class": parser})
        dispatcher = GuardedDispatcher()
        dispatcher.set_thread_count(adj.threads)
        super().__init__(app, {}, True, sock, dispatcher=dispatcher, adj=adj, bind_socket=False,
                         sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()))

    def getsockname(self):
        host, port = super().getsockname()
        return host, int(port)

    def note_refused(self, reason: str) -> None:
        self.refused[reason] += 1
        if self._on_refused is not None:
            self._on_refused(reason)

    def handle_accept(self):
        try:
            accepted = self.accept()
        except OSError:
            return
        if accepted is None:
            return
        conn, addr = accepted
        if not self.clients.admit(addr[0]):
            self.note_refused("client_connections")
            conn.close()
            return
        try:
            self.set_socket_options(conn)
            self.channel_class(self, conn, addr, self.adj, map=self._map)
        except OSError:  # the client left before we got to it
            self.clients.release(addr[0])
            conn.close()

    def task_finished(self) -> None:
        self.last_finished = time.monotonic()

    def stalled_for(self) -> float:
        """Seconds since a request thread last finished a request while others wait for one (0: not stalled)."""
        if not self.task_dispatcher.queued:
            return 0.0
        idle = time.monotonic() - self.last_finished
        return idle if idle > self.stall_after_s else 0.0

    def add_task(self, channel) -> None:
        request = channel.requests[0]
        route = self.admission.route(request, self.task_dispatcher.waiting_with_one_more())
        if route is Route.INLINE and request.error is None and request.path == "/healthz" and self.stalled_for():
            # Answered by the event loop, /healthz would stay "alive" with every request thread hung.
            request.error = Stalled(f"no request thread has finished a request for {self.stalled_for():.0f} s "
                                    f"while {self.task_dispatcher.queued} wait")
        if route is Route.SHED:
            request.error = ServiceBusy(f"more requests are waiting than the service may queue "
                                        f"({self.admission.max_queued}); retry after {RETRY_AFTER_S} s")
            request.body_was_read = True
            self.note_refused("queue_full")
        if route in (Route.INLINE, Route.SHED):
            channel.inline_pending = True  # run by the caller once it lets go of the channel's lock
        else:
            self.task_dispatcher.add_task(channel, front=route is Route.FRONT)

    def maintenance(self, now):
        super().maintenance(now)
        mono = time.monotonic()
        for channel in list(self.active_channels.values()):
            if channel.lingering_until is not None:
                if mono > channel.lingering_until:
                    channel.handle_close()
                continue
            request = channel.request
            if request is None or channel.requests or channel.will_close or channel.close_when_flushed:
                continue
            why = self.deadlines.expired(request, mono)
            if why:
                self.note_refused("head_deadline" if request.head_done_at is None else "body_deadline")
                with channel.requests_lock:
                    request.error, request.completed = RequestTimeout(why), True
                    channel.request = None
                    channel.requests.append(request)
                    self.add_task(channel)
                channel.run_inline()

    def _reserve_body(self, nbytes: int):
        release = self.buffers.try_reserve(nbytes)
        if release is None:
            self.note_refused("body_buffers_full")
        return release


def bind_listener(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The listening socket, bound at once (so "port in use" shows before models load). OSError if not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host.strip("[]"), port), family=family, backlog=backlog)
    sock.set_inheritable(True)
    return sock


def create_server(app, *, host: str, port: int, threads: int, max_request_body_size: int,
                  connection_limit: int = 1000, channel_timeout: int = 30, listen_socket=None,
                  max_queued_requests: int | None = None, max_connections_per_client: int = 64,
                  trusted_proxies: Iterable[str] = (), header_timeout_s: float = 10.0,
                  body_timeout_s: float = 60.0, max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
                  on_refused: Callable[[str], None] | None = None, stall_after_s: float = 120.0,
                  **adjustments) -> GuardedServer:
    """A server for ``app``, not yet running (call ``.run()``, or ``serve_until``).

    ``listen_socket``: accept on this already listening socket (``bind_listener``, or a
    ``--workers`` parent's) instead of binding ``host:port`` here. ``max_queued_requests``
    (default 2 x threads): model work waiting for a thread before more is refused.
    ``stall_after_s``: ``/healthz`` answers 503 once requests have waited this long with no
    request thread finishing one (hung threads), so a liveness probe can still restart the process.
    """
    sock = listen_socket if listen_socket is not None else bind_listener(host, port)
    _raise_open_files_limit(connection_limit + threads + 64)
    adj = Adjustments(
        threads=threads, max_request_body_size=max_request_body_size, connection_limit=connection_limit,
        channel_timeout=channel_timeout, ident="imageclf",
        cleanup_interval=1,  # also when the head and body deadlines are checked
        asyncore_use_poll=True,  # select() cannot watch more than 1,024 sockets
        # Reads of 64 KiB, not 8: a 3 MB phone photo took 5 ms less to receive (one buffer at a
        # time, in the event loop; a slow client still costs only what it has sent).
        recv_bytes=64 * 1024,
        **adjustments)
    queued = 2 * threads if max_queued_requests is None else max_queued_requests
    return GuardedServer(app, sock, adj, admission=Admission(queued),
                         clients=ClientConnections(max_connections_per_client, trusted_proxies),
                         buffers=BufferBudget(max_buffered_bytes),
                         deadlines=Deadlines(header_timeout_s, body_timeout_s), on_refused=on_refused,
                         stall_after_s=stall_after_s)


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
