"""HTTP/1.1 message framing by RFC 9112, on top of waitress' request parser.

Waitress accepts a few framings that a proxy in front of it may read differently, which is how
requests are smuggled: a request with both ``Content-Length`` and ``Transfer-Encoding`` (waitress
trusts the latter; a proxy that trusts the former sees a second request inside the body), a
``Transfer-Encoding`` on an HTTP/1.0 request, ``chunked`` listed twice, obsolete line folding and
bare LF line ends. Each of these is a 400 here, and the connection is closed after it, because
where one message ends can no longer be known (RFC 9112 §6.1, §6.3, §2.2, §5.2).

The parser also keeps what the server's deadlines and buffer budget need: when the request's
first byte came, when its head was complete, and the body bytes it reserved.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from waitress.parser import HTTPRequestParser, ParsingError
from waitress.utilities import Error

_HEAD_END = b"\r\n\r\n"
_FIELD = re.compile(rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+)[ \t]*:", re.M)


class ServiceBusy(Error):
    """Refused for load: the client should come back after ``Retry-After`` seconds."""

    code = 503
    reason = "Service Unavailable"


class Stalled(Error):
    """``/healthz`` when the request threads are hung: the process should be restarted."""

    code = 503
    reason = "Service Unavailable"


class RequestTimeout(Error):
    code = 408
    reason = "Request Timeout"


def framing_problem(head: bytes) -> str | None:
    """Why a request head (request line and fields, no final blank line) cannot be framed safely, or None."""
    if b"\n" in head.replace(b"\r\n", b"") or b"\r" in head.replace(b"\r\n", b""):
        return "bare CR or LF in the request head: lines must end with CRLF"
    request_line, _, fields = head.partition(b"\r\n")
    if fields[:1] in (b" ", b"\t") or b"\r\n " in fields or b"\r\n\t" in fields:
        return "obsolete line folding in a header field"
    names = [m.group(1).lower() for m in _FIELD.finditer(fields.replace(b"\r\n", b"\n"))]
    transfer_encodings = names.count(b"transfer-encoding")
    if transfer_encodings and b"content-length" in names:
        return "both Content-Length and Transfer-Encoding: the body's length is ambiguous"
    if transfer_encodings and request_line.endswith(b"HTTP/1.0"):
        return "Transfer-Encoding on an HTTP/1.0 request"
    if transfer_encodings > 1 or _chunked_count(fields) > 1:
        return "Transfer-Encoding given more than once"
    return None


def _chunked_count(fields: bytes) -> int:
    count = 0
    for line in fields.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"transfer-encoding":
            count += sum(1 for coding in value.split(b",") if coding.strip(b" \t").lower() == b"chunked")
    return count


class StrictRequestParser(HTTPRequestParser):
    """Waitress' parser with RFC 9112's framing rules, timestamps and a body reservation.

    ``reserve_body`` (a staticmethod set per server, see server.py) is asked for the bytes a body will be
    buffered in once its length is known; it returns a release function, or None when the
    server's buffers are full (the request is then answered 503 without reading the body).
    """

    reserve_body: Callable[[int], Callable[[], None] | None] | None = None

    def __init__(self, adj):
        super().__init__(adj)
        self.started = time.monotonic()
        self.head_done_at: float | None = None
        self._release: Callable[[], None] | None = None

    def received(self, data: bytes) -> int:
        was_in_head = not self.headers_finished
        consumed = super().received(data)
        if was_in_head and self.headers_finished:
            self.head_done_at = time.monotonic()
            if self.error is None:
                self._reserve_body()
        if self.error is not None:
            # Never invite a body that will not be read ("100 Continue" before a 413 or 400).
            self.expect_continue = False
        return consumed

    def parse_header(self, header_plus: bytes) -> None:
        problem = framing_problem(header_plus)
        if problem:
            self.connection_close = True
            raise ParsingError(problem)
        super().parse_header(header_plus)

    def _reserve_body(self) -> None:
        size = self.adj.max_request_body_size if self.chunked else self.content_length
        if not size or self.reserve_body is None:
            return
        self._release = self.reserve_body(size)
        if self._release is None:
            self.error = ServiceBusy("the service is receiving as many request bodies as it can buffer; "
                                     "retry shortly")
            self.completed = True
            self.body_rcv = None

    def close(self) -> None:
        super().close()
        release, self._release = self._release, None
        if release is not None:
            release()
