"""waitress's event loop, with epoll registrations kept from one turn to the next.

waitress's loop (``wasyncore.poll2``) asks every open connection ``readable()`` and
``writable()`` and registers it in a new poll object at every turn. With hundreds of idle
keep-alive connections that is most of the loop's work (about a fifth of a core at 256 clients,
benchmarks/README.md "Under load"). Here a connection waiting for its next request with nothing
to write stays registered for input and is not asked again until it has an event. The listener
(whose ``readable()`` runs the server's maintenance: idle timeouts, head and body deadlines) and
connections with work in flight (a request queued or running, output to write, a close pending,
a lingering close) are asked at every turn, as waitress asks all of them; every connection is
asked again at least every ``FULL_PASS_S``, and on every turn of a shutdown, since maintenance and
``serve_until`` change connections from outside their events.
"""

from __future__ import annotations

import select
import time

from waitress import wasyncore

#: The flags of a connection that only waits for input (what poll2 registers for it).
IDLE = select.EPOLLIN | select.EPOLLPRI
#: Every connection is asked again at least this often (maintenance runs once a second).
FULL_PASS_S = 0.5


def _flags(obj: wasyncore.dispatcher) -> int:
    """What to watch a dispatcher for, decided as wasyncore.poll2 decides it."""
    flags = 0
    if obj.readable():
        flags |= select.EPOLLIN | select.EPOLLPRI
    if obj.writable() and not obj.accepting:  # an accepting socket is never writable
        flags |= select.EPOLLOUT
    return flags


class EpollLoop:
    """Turns of the event loop over ``channels`` (a waitress socket map: fd -> dispatcher)."""

    def __init__(self, channels: dict):
        self.channels = channels
        self.epoll = select.epoll()
        self.registered: dict[int, tuple[object, int]] = {}  # fd -> (dispatcher, flags), flags never 0
        self.ask: set[int] = set()  # fds to ask again at the next turn
        self.next_full = 0.0

    def turn(self, timeout: float, full: bool = False) -> None:
        """Bring the registrations up to date, wait up to ``timeout`` seconds and dispatch the events."""
        now = time.monotonic()
        if full or now >= self.next_full:
            self.next_full = now + FULL_PASS_S
            self._update(list(self.channels))
        else:
            self._update(self._changed())
        try:
            events = self.epoll.poll(timeout)
        except InterruptedError:
            events = []
        for fd, flags in events:
            obj = self.channels.get(fd)
            if obj is not None:
                self.ask.add(fd)  # what it answers may change with what it does now
                wasyncore.readwrite(obj, flags)

    def close(self) -> None:
        self.epoll.close()

    def _changed(self) -> list[int]:
        """The fds to ask this turn: new ones (an fd number reused by a new connection too), those
        with work in flight or an event last turn, and the listener."""
        channels, registered = self.channels, self.registered
        for fd in registered.keys() - channels.keys():  # closed: epoll dropped it with the socket
            self._forget(fd)
            self.ask.discard(fd)
        changed = self.ask | (channels.keys() - registered.keys())
        changed.update(fd for fd, (obj, _) in registered.items() if channels.get(fd) is not obj)
        return list(changed)

    def _update(self, fds: list[int]) -> None:
        for fd in fds:
            obj = self.channels.get(fd)
            if obj is None:
                self._forget(fd)
                self.ask.discard(fd)
                continue
            flags = _flags(obj)
            self._register(fd, obj, flags)
            if flags == IDLE and not obj.accepting:
                self.ask.discard(fd)  # waits for input: its next event says when to ask again
            else:
                self.ask.add(fd)

    def _register(self, fd: int, obj: object, flags: int) -> None:
        old = self.registered.get(fd)
        if old is not None and old[0] is not obj:  # the fd number now belongs to another connection
            self._forget(fd)
            old = None
        if not flags:
            if old is not None:
                self._forget(fd)
            return
        if old is None:
            self.epoll.register(fd, flags)
        elif old[1] != flags:
            self.epoll.modify(fd, flags)
        self.registered[fd] = (obj, flags)

    def _forget(self, fd: int) -> None:
        if self.registered.pop(fd, None) is not None:
            try:
                self.epoll.unregister(fd)
            except OSError:  # closed already: epoll dropped it by itself
                pass
