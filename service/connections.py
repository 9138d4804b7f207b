"""Bounds on connections: per client address, on buffered request bodies, and on slow requests.

- ``ClientConnections``: at most ``cap`` open connections from one address, so one client (or
  one script) cannot take every slot of ``--connection_limit`` and lock everyone else out.
  Addresses in ``trusted`` (proxies, ingress controllers, load balancers) speak for many clients
  and are held only to the global limit.
- ``BufferBudget``: request bodies are buffered whole before a thread sees them (in memory, or
  in a temporary file past 512 KiB); this bounds their sum across all connections.
- ``Deadlines``: a whole request head must arrive within ``head_s`` of its first byte, and a
  whole body within ``body_s`` of the head, however steadily it trickles in (the channel
  timeout only catches silence).
"""

from __future__ import annotations

import ipaddress
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass


def parse_networks(values: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Addresses or CIDR networks (``10.0.0.0/8``, ``::1``); ValueError names a bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"'{value.strip()}' is not an IP address or network (like 10.0.0.0/8)") from None
    return tuple(networks)


class ClientConnections:
    """Open connections per client address, with a cap (0: none) that trusted proxies are exempt from."""

    def __init__(self, cap: int, trusted: Iterable[str] = ()):
        self.cap = cap
        self.trusted = parse_networks(trusted)
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def admit(self, address: str) -> bool:
        """Count a new connection from ``address``; False (and not counted) if it is over the cap."""
        with self._lock:
            if self.cap and self._open[address] >= self.cap and not self._is_trusted(address):
                return False
            self._open[address] += 1
            return True

    def release(self, address: str) -> None:
        with self._lock:
            self._open[address] -= 1
            if self._open[address] <= 0:
                del self._open[address]

    def open_from(self, address: str) -> int:
        return self._open.get(address, 0)

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.trusted)


class BufferBudget:
    """Bytes of request bodies buffered at once, across all connections."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._lock = threading.Lock()

    def try_reserve(self, nbytes: int) -> Callable[[], None] | None:
        """Reserve ``nbytes``; the function that gives them back, or None if they do not fit now."""
        with self._lock:
            if self.used + nbytes > self.capacity:
                return None
            self.used += nbytes
        released = []

        def release() -> None:
            with self._lock:
                if not released:
                    released.append(True)
                    self.used -= nbytes
        return release


@dataclass(frozen=True)
class Deadlines:
    head_s: float = 10.0   # from a request's first byte to the end of its head
    body_s: float = 60.0   # from the end of the head to the end of the body

    def expired(self, request, now: float) -> str | None:
        """Why the partly received ``request`` (a StrictRequestParser) is out of time, or None."""
        if request.completed:
            return None
        if request.head_done_at is None:
            if now - request.started > self.head_s:
                return f"the request head did not arrive within {self.head_s:g} s"
            return None
        if now - request.head_done_at > self.body_s:
            return f"the request body did not arrive within {self.body_s:g} s"
        return None
