"""serve_until's graceful stop, in process, with the stop placed exactly where a race puts it.

The subprocess SIGTERM tests (test_backend, test_workers) cannot choose when the signal lands
relative to the event loop's reads; these tests can, by holding the loop at its stop check.
"""

from __future__ import annotations

import socket
import threading

from service.server import create_server, serve_until


def _app(environ, start_response):
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    answer = b"got %d bytes" % len(body)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(answer)))])
    return [answer]


class HeldStop(threading.Event):
    """A stop event whose ``is_set`` can be held: ``hold()`` makes the loop's next check wait until
    ``release_set()``, which sets the stop, so the loop sees it before it reads anything else."""

    def __init__(self):
        super().__init__()
        self._holding, self._held, self._go = False, threading.Event(), threading.Event()

    def hold(self) -> None:
        self._holding = True
        assert self._held.wait(10), "the loop did not come back to its stop check"

    def release_set(self) -> None:
        self.set()
        self._go.set()

    def is_set(self) -> bool:
        if self._holding and not self._go.is_set():
            self._held.set()
            self._go.wait(10)
        return super().is_set()


def _read_answer(conn: socket.socket) -> bytes:
    raw = b""
    while b"\r\n\r\n" not in raw or not raw.endswith(b"bytes"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        raw += chunk
    return raw


def test_a_request_sent_before_the_stop_but_not_yet_read_is_answered():
    server = create_server(_app, host="127.0.0.1", port=0, threads=2, max_request_body_size=1 << 20)
    port = server.getsockname()[1]
    stop = HeldStop()
    loop = threading.Thread(target=serve_until, args=(server, stop, 5.0), daemon=True)
    loop.start()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in _read_answer(conn)  # the connection is accepted and idle

        stop.hold()  # the loop waits at its stop check, so it reads nothing from here on...
        conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        stop.release_set()  # ...and then sees the stop before the bytes above
        conn.sendall(b"67890")
        answer = _read_answer(conn)
    loop.join(10)
    assert not loop.is_alive()
    assert b"200 OK" in answer and answer.endswith(b"got 10 bytes"), answer


def test_idle_connections_are_closed_at_the_stop_without_waiting_for_the_grace():
    server = create_server(_app, host="127.0.0.1", port=0, threads=2, max_request_body_size=1 << 20)
    port = server.getsockname()[1]
    stop = threading.Event()
    loop = threading.Thread(target=serve_until, args=(server, stop, 30.0), daemon=True)
    loop.start()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in _read_answer(conn)
        stop.set()
        server.pull_trigger()
        loop.join(10)
        assert not loop.is_alive()  # well inside the 30 s grace: nothing was busy
        assert conn.recv(1) == b""  # closed cleanly, not left open
