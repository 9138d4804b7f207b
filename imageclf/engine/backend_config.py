"""``--backend grpc://HOST:PORT`` and its settings, checked without importing TensorFlow or gRPC."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackendOptions:
    url: str                    # grpc://HOST:PORT
    models: tuple[str, ...]     # the first is the default model
    timeout_s: float = 5.0      # deadline of each call
    max_calls: int = 8          # calls in flight at once
    poll_seconds: float = 1.0   # how often GetModelStatus is asked about each model

    @property
    def target(self) -> str:
        return parse_backend_url(self.url)


def parse_backend_url(url: str) -> str:
    """``grpc://HOST:PORT`` -> ``HOST:PORT`` (the gRPC target); ValueError with the reason otherwise."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != "grpc":
        raise ValueError(f"'{url}' is not grpc://HOST:PORT (only plaintext gRPC is supported)")
    host, colon, port = rest.rpartition(":")
    if not colon or not host or "/" in rest or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'{url}' is not grpc://HOST:PORT (for example grpc://tfserving:8500)")
    return rest
