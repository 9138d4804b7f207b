"""A real service for tests: waitress on a free 127.0.0.1 port, in a thread, as deployed."""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

from imageclf.engine.registry import ModelRegistry
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


class HttpAndGrpc:
    """The HTTP service and the gRPC server over its engine and metrics, as ``python -m service`` wires them."""

    def __init__(self, graphs: Path, root: Path, **config):
        from service.grpc_api import GrpcServer

        self.http = Server(graphs, root, **config)
        shared = self.http.app.extensions["imageclf"]
        self.engine, self.metrics = shared["engine"], shared["metrics"]
        self.grpc = GrpcServer(self.engine, self.metrics, host="127.0.0.1", port=0, threads=4,
                               max_message_bytes=self.http.config.max_upload_bytes + 65536, max_concurrent_rpcs=16)
        self.grpc.start()

    def close(self) -> None:
        self.grpc.stop(grace=1)
        self.http.close()


def retrained_with_pictures(tiny_module: Path, out: Path, model: str, **options):
    """A graph retrained on the tiny base into ``out/graphs/<model>.pb`` and the pictures it was trained on,
    plus two more beside them: a PNG of a class and a gray PNG over 1,000,000 pixels."""
    import numpy as np
    from PIL import Image

    from imageclf.retrain import retrain
    from imageclf.training import TrainConfig
    from tests.conftest import quick_options
    from tests.demo_data import draw_shape, make_dataset

    images = out / "images"
    make_dataset(images, per_class=8)
    opts = quick_options(images, out, tfhub_module=str(tiny_module),
                         training=TrainConfig(steps=100, eval_step_interval=100, progress=False), **options)
    opts.output_graph = str(out / "graphs" / f"{model}.pb")
    result = retrain(opts, log=lambda line: None)
    draw_shape("triangle", np.random.default_rng(5), (90, 70)).save(images / "triangle.png")
    Image.new("RGB", (1100, 1000), "gray").save(images / "huge.png")
    return result, images
