"""The event loop keeps its epoll registrations: idle keep-alive connections cost nothing per turn.

waitress's own loop asks every open connection readable() and writable() at every turn. Here
(service/event_loop.py) an idle connection is asked only at the loop's periodic full pass, while
the requests of another client turn the loop many times. Everything else about the loop (every
answer, deadlines, lingering closes, shedding, shutdown) is exercised by the service tests that
run on it: test_overload, test_server_shutdown, test_service.
"""

from __future__ import annotations

import http.client
import socket
import time
from pathlib import Path

import pytest

from service.event_loop import FULL_PASS_S
from tests.demo_data import make_dataset

from .conftest import tiny_graphs_dir
from .service_helpers import Server

IDLE_CONNECTIONS = 200
REQUESTS = 100


@pytest.fixture(scope="module")
def graphs(tiny_module, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("event_loop")
    make_dataset(out / "data", per_class=6, classes=("circle", "square", "triangle"))
    return tiny_graphs_dir(out / "data", tiny_module, out, "shapes")


def test_idle_keep_alive_connections_are_not_asked_at_every_turn(graphs, tmp_path):
    server = Server(graphs, tmp_path, http={"max_connections_per_client": 0})
    asked: dict[int, int] = {}
    channel_class = server.server.channel_class

    def readable(channel) -> bool:
        asked[id(channel)] = asked.get(id(channel), 0) + 1
        return channel_class.readable(channel)

    server.server.channel_class = type("Counted", (channel_class,), {"readable": readable})
    idle = []
    try:
        for _ in range(IDLE_CONNECTIONS):  # each answered once, then left open and silent
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("GET", "/healthz")
            assert conn.getresponse().read() and conn.sock is not None
            idle.append(conn)
        time.sleep(0.2)
        before = dict(asked)
        busy = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        started = time.monotonic()
        for _ in range(REQUESTS):  # each takes the loop at least two turns: read it, write the answer
            busy.request("GET", "/healthz")
            assert busy.getresponse().read()
        elapsed = time.monotonic() - started
        busy.close()
        idle_asks = [asked[key] - before.get(key, 0) for key in before]
        assert len(idle_asks) == IDLE_CONNECTIONS
        # waitress's loop asks each idle connection at every turn: 140 times for these 100 requests (measured).
        allowed = elapsed / FULL_PASS_S + 3
        assert max(idle_asks) <= allowed < 2 * REQUESTS, (max(idle_asks), allowed, elapsed)
        for conn in idle:  # and they still work
            conn.request("GET", "/healthz")
            assert conn.getresponse().status == 200
    finally:
        for conn in idle:
            conn.close()
        server.close()


def test_a_connection_closed_by_its_client_is_dropped_and_its_fd_reused(graphs, tmp_path):
    """Clients come and go by the hundred: fd numbers are reused by new connections, which must be
    registered as themselves (a stale registration would leave a new connection unanswered)."""
    server = Server(graphs, tmp_path, http={"max_connections_per_client": 0})
    try:
        for _ in range(300):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        server.close()
