"""A real service for tests: waitress on a free 127.0.0.1 port, in a thread, as deployed."""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

from imageclf.serving.registry import ModelRegistry
from service.app import ServiceConfig, create_app
from service.server import create_server


@contextlib.contextmanager
def held(registry: ModelRegistry, name: str | None = None, version: int | None = None):
    """The served version of ``name`` (None: the newest model), or its ``version``, held for the ``with``
    block, as Engine.hold holds it for a request."""
    servable = registry.acquire(name, version)
    try:
        yield servable
    finally:
        servable.release()


class Server:
    def __init__(self, graphs: Path, root: Path, threads: int = 8, channel_timeout: int = 30,
                 connection_limit: int = 1000, http: dict | None = None, **config):
        """``http``: more settings of the HTTP server (service.server.create_server's keywords)."""
        config.setdefault("batch_size", threads)
        self.config = ServiceConfig(graphs_dir=str(graphs), image_root=str(root), **config)
        self.registry = ModelRegistry(graphs, poll_seconds=0.2, batching=self.config.batching(),
                                      runtime=self.config.runtime, keep_versions=self.config.keep_versions)
        self.app = create_app(self.config, self.registry)
        self.registry.start()
        self.server = create_server(self.app, host="127.0.0.1", port=0, threads=threads,
                                    max_request_body_size=self.config.max_upload_bytes + 65536,
                                    channel_timeout=channel_timeout, connection_limit=connection_limit,
                                    **(http or {}))
        self.port = self.server.effective_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    @property
    def engine(self):
        return self.app.extensions["imageclf"]["engine"]

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None,
                timeout: float = 60):
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.headers.get_content_type(), response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get_content_type(), e.read()

    def response(self, path: str, **kw):
        """The whole response: (status, headers, body)."""
        req = urllib.request.Request(self.url + path, data=kw.get("data"), headers=kw.get("headers") or {},
                                     method=kw.get("method"))
        try:
            with urllib.request.urlopen(req, timeout=kw.get("timeout", 60)) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def json(self, path: str, **kw):
        status, kind, body = self.request(path, **kw)
        assert kind == "application/json", body[:200]
        return status, json.loads(body)

    def close(self):
        self.server.close()
        self.thread.join(timeout=10)
        self.server.task_dispatcher.shutdown()
        self.registry.stop()


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, dict]:
    boundary = "----imageclf-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
