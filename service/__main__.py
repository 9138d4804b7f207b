"""``python -m service``: serve every graph in a folder with waitress."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from imageclf.cli_common import quiet_tensorflow, run
from imageclf.images import DEFAULT_MAX_PIXELS

EPILOG = """\
Every flag can also be set with an environment variable: IMAGECLF_HOST, IMAGECLF_PORT,
IMAGECLF_GRAPHS_DIR, IMAGECLF_IMAGE_ROOT, IMAGECLF_THREADS, IMAGECLF_MAX_UPLOAD_BYTES,
IMAGECLF_MAX_PIXELS, IMAGECLF_MAX_INSTANCES, IMAGECLF_MEMORY_BUDGET_MB, IMAGECLF_BATCH_SIZE,
IMAGECLF_BATCH_WAIT_MS, IMAGECLF_BATCH_TIMEOUT_S, IMAGECLF_CONNECTION_LIMIT, IMAGECLF_CHANNEL_TIMEOUT,
IMAGECLF_ALLOWED_HOSTS, IMAGECLF_GRPC_PORT, IMAGECLF_GRPC_MAX_CONCURRENT_RPCS. Flags win over the
environment.

Try:
  curl 'localhost:8000/?file=sample_images/circle/circle_000.jpg'
  curl -F image=@sample_images/square/square_000.jpg localhost:8000/classify
  open http://localhost:8000/ in a browser
  TensorFlow Serving gRPC clients: localhost:8500 (PredictionService, ModelService)
"""


def _env(name: str, default):
    value = os.environ.get(f"IMAGECLF_{name.upper()}")
    return type(default)(value) if value is not None else default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service", epilog=EPILOG,
                                description="Serve the frozen graphs in a folder over HTTP (JSON, "
                                            "a browser page, and the TensorFlow Serving REST API) and "
                                            "TensorFlow Serving's gRPC API.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default=_env("host", "127.0.0.1"), help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=_env("port", 8000), help="port (default: %(default)s)")
    p.add_argument("--graphs_dir", default=_env("graphs_dir", "graphs"),
                   help="folder of .pb graphs to serve; watched for changes (default: %(default)s)")
    p.add_argument("--image_root", default=_env("image_root", "."),
                   help="GET /?file=PATH reads only below this folder (default: %(default)s)")
    p.add_argument("--threads", type=int, default=_env("threads", 8), help="request threads (default: %(default)s)")
    p.add_argument("--max_upload_bytes", type=int, default=_env("max_upload_bytes", 10 * 1024 * 1024),
                   help="largest upload or file accepted (default: %(default)s)")
    p.add_argument("--max_pixels", type=int, default=_env("max_pixels", DEFAULT_MAX_PIXELS),
                   help="largest image, in pixels (default: %(default)s)")
    p.add_argument("--max_instances", type=int, default=_env("max_instances", 64),
                   help="most images in one TF Serving :predict or :classify request; more get 413 "
                        "(default: %(default)s)")
    p.add_argument("--memory_budget_mb", type=int, default=_env("memory_budget_mb", 1024),
                   help="memory that decoding may take across all requests at once; when it is full, "
                        "requests wait up to 2 s, then get 503 with Retry-After (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=_env("batch_size", 0),
                   help="most images served by one model call (default: --threads)")
    p.add_argument("--batch_wait_ms", type=float, default=_env("batch_wait_ms", 2.0),
                   help="while another model call is running, how long a new batch waits for more requests "
                        "to join it; a lone request never waits; 0 disables waiting (default: %(default)s)")
    p.add_argument("--batch_timeout_s", type=float, default=_env("batch_timeout_s", 30.0),
                   help="how long a request waits for a model call that another request runs; then 503 "
                        "(default: %(default)s)")
    p.add_argument("--connection_limit", type=int, default=_env("connection_limit", 1000),
                   help="open connections accepted at once (default: %(default)s)")
    p.add_argument("--channel_timeout", type=int, default=_env("channel_timeout", 30),
                   help="seconds a connection may stay silent (mid-request or idle) before it is closed "
                        "(default: %(default)s)")
    p.add_argument("--grpc_port", type=int, default=_env("grpc_port", 8500),
                   help="port for TensorFlow Serving's gRPC API (Predict, Classify, GetModelMetadata, "
                        "GetModelStatus) on --host; 0 turns it off (default: %(default)s)")
    p.add_argument("--grpc_max_concurrent_rpcs", type=int, default=_env("grpc_max_concurrent_rpcs", 0),
                   help="gRPC calls in progress or waiting for a thread at once; more are refused with "
                        "RESOURCE_EXHAUSTED (default: 4 x --threads)")
    p.add_argument("--allowed_hosts", default=_env("allowed_hosts", ""),
                   help="comma-separated Host names the service answers to (others get 400, which stops "
                        "DNS rebinding); default: localhost names when --host is a loopback address, "
                        "any name otherwise")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("threads", "max_upload_bytes", "max_pixels", "max_instances", "memory_budget_mb",
                 "batch_timeout_s", "connection_limit", "channel_timeout"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive")
    if args.batch_size < 0 or args.batch_wait_ms < 0:
        parser.error("--batch_size and --batch_wait_ms must not be negative")
    if not 0 <= args.grpc_port <= 65535 or args.grpc_max_concurrent_rpcs < 0:
        parser.error("--grpc_port must be 0 (off) to 65535 and --grpc_max_concurrent_rpcs not negative")
    quiet_tensorflow()
    from imageclf.errors import UserError
    from service.app import ServiceConfig, create_app
    from service.security import default_allowed_hosts
    from service.server import create_server

    if not os.path.isdir(args.graphs_dir):
        raise UserError(f"--graphs_dir {args.graphs_dir}: no such folder (run retrain.py first)")
    if not os.path.isdir(args.image_root):
        raise UserError(f"--image_root {args.image_root}: no such folder")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    allowed = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()) or \
        default_allowed_hosts(args.host)
    if allowed and "*" in allowed:
        allowed = None
    config = ServiceConfig(graphs_dir=args.graphs_dir, image_root=args.image_root,
                           max_upload_bytes=args.max_upload_bytes, max_pixels=args.max_pixels,
                           max_instances=args.max_instances, memory_budget_mb=args.memory_budget_mb,
                           batch_size=args.batch_size or args.threads, batch_wait_ms=args.batch_wait_ms,
                           batch_timeout_s=args.batch_timeout_s, allowed_hosts=allowed)
    app = create_app(config)
    server = create_server(app, host=args.host, port=args.port, threads=args.threads,
                           max_request_body_size=args.max_upload_bytes + 65536,
                           connection_limit=args.connection_limit, channel_timeout=args.channel_timeout)
    grpc_server = _grpc_server(args, app) if args.grpc_port else None
    also = f" and gRPC on {args.host}:{grpc_server.port}" if grpc_server else ""
    print(f"Serving {args.graphs_dir}/ on http://{args.host}:{args.port}/{also}  (Ctrl-C to stop)", flush=True)
    try:
        if grpc_server:
            grpc_server.start()
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        if grpc_server:
            grpc_server.stop()
        server.close()
    return 0


def _grpc_server(args: argparse.Namespace, app):
    """TensorFlow Serving's gRPC API over the app's engine and metrics, with the HTTP side's bounds."""
    from imageclf.errors import UserError
    from service.grpc_api import GrpcServer

    shared = app.extensions["imageclf"]
    try:
        return GrpcServer(shared["engine"], shared["metrics"], host=args.host, port=args.grpc_port,
                          threads=args.threads, max_message_bytes=args.max_upload_bytes + 65536,
                          max_concurrent_rpcs=args.grpc_max_concurrent_rpcs or 4 * args.threads)
    except OSError as e:
        raise UserError(f"--grpc_port {args.grpc_port}: {e}; pick another port, or 0 to turn gRPC off") from None


if __name__ == "__main__":
    sys.exit(run("python -m service", main))
