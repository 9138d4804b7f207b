"""``python -m service``: serve every graph in a folder with waitress."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence

from imageclf.cli_common import OneLineErrorParser, missing_packages_exit, quiet_tensorflow, run

with missing_packages_exit("python -m service"):  # outside the project's virtualenv: one line, not a traceback
    from imageclf.images import DEFAULT_MAX_PIXELS
    from imageclf.runtimes import RUNTIMES

SHUTDOWN_GRACE_S = 5.0

EPILOG = """\
Every flag can also be set with an environment variable: IMAGECLF_HOST, IMAGECLF_PORT,
IMAGECLF_GRAPHS_DIR, IMAGECLF_IMAGE_ROOT, IMAGECLF_THREADS, IMAGECLF_MAX_UPLOAD_BYTES,
IMAGECLF_MAX_PIXELS, IMAGECLF_MAX_INSTANCES, IMAGECLF_MEMORY_BUDGET_MB, IMAGECLF_BATCH_SIZE,
IMAGECLF_BATCH_WAIT_MS, IMAGECLF_BATCH_TIMEOUT_S, IMAGECLF_CONNECTION_LIMIT, IMAGECLF_CHANNEL_TIMEOUT,
IMAGECLF_ALLOWED_HOSTS, IMAGECLF_GRPC_PORT, IMAGECLF_GRPC_MAX_CONCURRENT_RPCS, IMAGECLF_BACKEND,
IMAGECLF_BACKEND_MODELS, IMAGECLF_BACKEND_TIMEOUT_S, IMAGECLF_BACKEND_MAX_CALLS, IMAGECLF_WORKERS,
IMAGECLF_INTRA_OP_THREADS, IMAGECLF_INTER_OP_THREADS, IMAGECLF_MAX_QUEUED_REQUESTS,
IMAGECLF_MAX_CONNECTIONS_PER_CLIENT, IMAGECLF_TRUSTED_PROXIES, IMAGECLF_HEADER_TIMEOUT_S,
IMAGECLF_BODY_TIMEOUT_S, IMAGECLF_MAX_BUFFERED_MB, IMAGECLF_RUNTIME, IMAGECLF_LITERT_THREADS,
IMAGECLF_LITERT_CACHE_DIR. Flags win over the environment.

Try:
  curl 'localhost:8000/?file=sample_images/circle/circle_000.jpg'
  curl -F image=@sample_images/square/square_000.jpg localhost:8000/classify
  open http://localhost:8000/ in a browser
  TensorFlow Serving gRPC clients: localhost:8500 (PredictionService, ModelService)

As a front for TensorFlow Serving (or another python -m service) serving the exported SavedModel:
  python -m service --backend grpc://tfserving:8500 --backend_models sample_images

With LiteRT (XNNPACK) instead of a TensorFlow session: same answers, faster, a fraction of the memory:
  python -m service --runtime litert --grpc_port 0   # gRPC needs TensorFlow's protos; HTTP alone does not

Keep older versions loaded beside the newest (kept by retrain.py in graphs/history/NAME/):
  python -m service --keep_versions dogs=1765000000   # then /v1/models/dogs/versions/1765000000:predict

On a machine with many cores (see docs/serving.md, "Big machines"):
  python -m service --workers 4 --threads 8     # 4 processes on one port, cores split between them

SIGTERM or Ctrl-C: new connections are refused, requests in progress get up to 5 s to finish.
"""


class _Environment:
    """Flag defaults from IMAGECLF_* variables; a value that does not parse is kept as an error to report."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, name: str, default):
        variable = f"IMAGECLF_{name.upper()}"
        value = os.environ.get(variable)
        if value is None:
            return default
        try:
            return type(default)(value)
        except ValueError:
            kind = {int: "a whole number", float: "a number"}.get(type(default), type(default).__name__)
            self.errors.append(f"{variable}={value[:40]!r} is not {kind}")
            return default


def build_parser() -> argparse.ArgumentParser:
    _env = _Environment()
    p = OneLineErrorParser(prog="python -m service", epilog=EPILOG,
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
                        "RESOURCE_EXHAUSTED at once (default: --threads + --max_queued_requests)")
    p.add_argument("--backend", default=_env("backend", ""),
                   help="grpc://HOST:PORT of a TensorFlow Serving (or another python -m service) serving the "
                        "models' exported SavedModels: inference is forwarded there (predict_images, pixels "
                        "decoded here), no graph is loaded here, and --graphs_dir is not read (default: none)")
    p.add_argument("--backend_models", default=_env("backend_models", ""),
                   help="with --backend: the model names to serve, comma-separated; the first is the default "
                        "model (TensorFlow Serving has no call that lists its models)")
    p.add_argument("--backend_timeout_s", type=float, default=_env("backend_timeout_s", 5.0),
                   help="deadline of each call to the backend; then 503 (default: %(default)s)")
    p.add_argument("--backend_max_calls", type=int, default=_env("backend_max_calls", 0),
                   help="calls to the backend in flight at once; more wait up to --backend_timeout_s, then 503 "
                        "(default: --threads)")
    p.add_argument("--workers", type=int, default=_env("workers", 1),
                   help="service processes answering on the same port, each with its own --threads, models and "
                        "GIL, under a parent that passes SIGTERM on to them; each gets --memory_budget_mb / N "
                        "and, unless given, --intra_op_threads cores / N (default: %(default)s)")
    p.add_argument("--intra_op_threads", type=int, default=_env("intra_op_threads", 0),
                   help="TensorFlow threads that one operation (a convolution) may use, per process; 0: one per "
                        "core, or cores / --workers (default: %(default)s)")
    p.add_argument("--inter_op_threads", type=int, default=_env("inter_op_threads", 0),
                   help="TensorFlow threads running independent operations at once, per process; 0: TensorFlow's "
                        "choice, or 1-2 with --workers (default: %(default)s)")
    p.add_argument("--runtime", choices=RUNTIMES, default=_env("runtime", "tf"),
                   help="what runs the graphs: tf, a TensorFlow session (tf.compat.v1), or litert, LiteRT's "
                        "interpreter with XNNPACK (each graph converted once in a child process and cached); a "
                        "graph LiteRT cannot run is served by TensorFlow, with the reason in /models "
                        "(default: %(default)s)")
    p.add_argument("--litert_threads", type=int, default=_env("litert_threads", 1),
                   help="with --runtime litert: threads of one interpreter; each model gets cores / this many "
                        "interpreters, so that batches run side by side (default: %(default)s)")
    p.add_argument("--litert_cache_dir", default=_env("litert_cache_dir", ""),
                   help="with --runtime litert: where converted models are kept (default: "
                        "$XDG_CACHE_HOME/imageclf/litert, else ~/.cache/imageclf/litert)")
    # Under load (docs/serving.md, "Under load").
    p.add_argument("--max_queued_requests", type=int, default=_env("max_queued_requests", 0),
                   help="requests that run the model (uploads, ?file=, :predict...) waiting for a free thread; "
                        "more are answered 503 with Retry-After at once, and /healthz, /readyz never wait "
                        "(default: 2 x --threads)")
    p.add_argument("--max_connections_per_client", type=int, default=_env("max_connections_per_client", 64),
                   help="open connections from one client address; more are closed at once, so one client "
                        "cannot take every slot of --connection_limit; 0: no cap (default: %(default)s)")
    p.add_argument("--trusted_proxies", default=_env("trusted_proxies", ""),
                   help="comma-separated addresses or networks (10.0.0.0/8) of proxies, ingress controllers or "
                        "load balancers in front of the service: their connections carry many clients and are "
                        "held only to --connection_limit (default: none)")
    p.add_argument("--header_timeout_s", type=float, default=_env("header_timeout_s", 10.0),
                   help="a request head must arrive whole within this time of its first byte, else 408 "
                        "(default: %(default)s)")
    p.add_argument("--body_timeout_s", type=float, default=_env("body_timeout_s", 60.0),
                   help="a request body must arrive whole within this time of its head, else 408 "
                        "(default: %(default)s)")
    p.add_argument("--max_buffered_mb", type=int, default=_env("max_buffered_mb", 256),
                   help="request bodies received and not yet answered, all connections together; a request "
                        "whose body does not fit is answered 503 with Retry-After (default: %(default)s)")
    # Internal: how the --workers parent starts each worker (see service/workers.py).
    p.add_argument("--listen_fd", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--worker_index", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--keep_versions", action="append", default=[], metavar="NAME=V[,V...]",
                   help="also keep these versions of model NAME loaded, from graphs/history/NAME/ (kept by "
                        "retrain.py), for /v1/models/NAME/versions/V requests; repeat for other models "
                        "(default: only the newest version of each model is served)")
    p.add_argument("--allowed_hosts", default=_env("allowed_hosts", ""),
                   help="comma-separated Host names the service answers to (others get 400, which stops "
                        "DNS rebinding); default: localhost names when --host is a loopback address, "
                        "any name otherwise")
    p.env_errors = _env.errors
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from imageclf.errors import UserError

    if parser.env_errors:
        raise UserError(parser.env_errors[0])
    _check_flags(parser, args)
    backend = _backend(parser, args)
    if args.workers > 1:
        return _run_workers(parser, args, sys.argv[1:] if argv is None else list(argv))
    if backend is None and not os.path.isdir(args.graphs_dir):
        raise UserError(f"--graphs_dir {args.graphs_dir}: no such folder (run retrain.py first)")
    if not os.path.isdir(args.image_root):
        raise UserError(f"--image_root {args.image_root}: no such folder")
    worker = args.listen_fd >= 0
    from imageclf.engine.trim import limit_malloc_arenas

    limit_malloc_arenas()  # before any thread allocates: request threads share arenas (trim.py)
    # Ports first: a port in use is one line before a single model is loaded.
    listener = socket.socket(fileno=args.listen_fd) if worker else _bind_http(args.host, args.port)
    if args.grpc_port and not worker:
        _check_grpc_port(args.host, args.grpc_port)
    if args.runtime == "tf" or args.grpc_port or backend is not None:
        # A LiteRT service that answers HTTP alone never loads TensorFlow (gRPC needs its protos).
        quiet_tensorflow()
        _tensorflow_threads(args.intra_op_threads, args.inter_op_threads)
    from service.app import create_app
    from service.server import create_server, serve_until

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(_service_config(args, backend), start_registry=False)
    shared = app.extensions["imageclf"]
    if worker:
        shared["metrics"].set_worker(args.worker_index)
    server = create_server(app, host=args.host, port=args.port, threads=args.threads, listen_socket=listener,
                           max_request_body_size=args.max_upload_bytes + 65536,
                           connection_limit=args.connection_limit, channel_timeout=args.channel_timeout,
                           max_queued_requests=_max_queued(args),
                           max_connections_per_client=args.max_connections_per_client,
                           trusted_proxies=_split(args.trusted_proxies), header_timeout_s=args.header_timeout_s,
                           body_timeout_s=args.body_timeout_s, max_buffered_bytes=args.max_buffered_mb << 20,
                           on_refused=shared["metrics"].refused,
                           # Longer than any wait the service itself bounds (a batch, the decode budget).
                           stall_after_s=max(60.0, 4 * args.batch_timeout_s))
    shared["metrics"].watch_server(server)
    grpc_server = _grpc_server(args, app) if args.grpc_port else None
    shared["registry"].start()
    also = f" and gRPC on {args.host}:{grpc_server.port}" if grpc_server else ""
    what = f"models {', '.join(backend.models)} of {backend.url}" if backend else f"{args.graphs_dir}/"
    who = f"Worker {args.worker_index} (pid {os.getpid()}) serving" if worker else "Serving"
    print(f"{who} {what} on http://{args.host}:{server.effective_port}/{also}  (Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    _stop_on_signals(stop, server)
    grpc_stopper = None
    try:
        if grpc_server:
            grpc_server.start()
            # gRPC refuses new calls from the moment the stop is asked for, as HTTP does, and drains beside it.
            grpc_stopper = threading.Thread(target=lambda: stop.wait() and grpc_server.stop(SHUTDOWN_GRACE_S),
                                            name="grpc-stopper", daemon=True)
            grpc_stopper.start()
        serve_until(server, stop, SHUTDOWN_GRACE_S)
    finally:
        stop.set()
        if grpc_stopper is not None:
            grpc_stopper.join()
        shared["registry"].stop()
    print("Stopped.", flush=True)
    return 0


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("threads", "max_upload_bytes", "max_pixels", "max_instances", "memory_budget_mb",
                 "batch_timeout_s", "connection_limit", "channel_timeout", "header_timeout_s", "body_timeout_s",
                 "max_buffered_mb"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive")
    for flag in ("batch_size", "batch_wait_ms", "max_queued_requests", "max_connections_per_client"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} must not be negative")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: a port is 0 to 65535")
    if not 0 <= args.grpc_port <= 65535 or args.grpc_max_concurrent_rpcs < 0:
        parser.error("--grpc_port must be 0 (off) to 65535 and --grpc_max_concurrent_rpcs not negative")
    if args.litert_threads <= 0:
        parser.error("--litert_threads must be positive")
    if args.runtime not in RUNTIMES:  # argparse checks the choices of flags, not of IMAGECLF_RUNTIME
        parser.error(f"--runtime (IMAGECLF_RUNTIME) {args.runtime[:40]!r}: choose from {', '.join(RUNTIMES)}")
    if args.workers <= 0 or args.intra_op_threads < 0 or args.inter_op_threads < 0:
        parser.error("--workers must be positive, --intra_op_threads and --inter_op_threads not negative")
    from service.connections import parse_networks

    try:
        parse_networks(_split(args.trusted_proxies))
    except ValueError as e:
        parser.error(f"--trusted_proxies: {e}")
    try:
        args.pinned = kept_versions(args.keep_versions)
    except ValueError as e:
        parser.error(f"--keep_versions: {e}")


def kept_versions(values: Sequence[str]) -> dict[str, set[int]]:
    """``["dogs=3,4", "cats=7"]`` -> ``{"dogs": {3, 4}, "cats": {7}}``; ValueError naming a bad value."""
    kept: dict[str, set[int]] = {}
    for value in values:
        name, _, versions = value.partition("=")
        numbers = _split(versions)
        if not name.strip() or not numbers or not all(v.isdigit() for v in numbers):
            raise ValueError(f"{value[:60]!r} is not NAME=VERSION[,VERSION...] (e.g. dogs=3,4)")
        kept.setdefault(name.strip(), set()).update(int(v) for v in numbers)
    return kept


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _max_queued(args: argparse.Namespace) -> int:
    return args.max_queued_requests or 2 * args.threads


def _bind_http(host: str, port: int) -> socket.socket:
    from imageclf.errors import UserError
    from service.server import bind_listener

    try:
        return bind_listener(host, port)
    except OSError as e:
        raise UserError(f"--port {port}: cannot listen on {host}:{port}: {e.strerror or e}") from None


def _check_grpc_port(host: str, port: int) -> None:
    """Fail now, in one line, if gRPC could not listen on ``port`` later (after the models load)."""
    from imageclf.errors import UserError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As gRPC binds: connections of a previous run still in TIME_WAIT do not make the port busy.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host.strip("[]"), port))
            probe.listen(1)  # what gRPC will do: a port another program only bound would fail here too
    except OSError as e:
        raise UserError(f"--grpc_port {port}: cannot listen on {host}:{port}: {e.strerror or e}; "
                        "pick another port, or 0 to turn gRPC off") from None


def _service_config(args: argparse.Namespace, backend):
    from service.app import ServiceConfig
    from service.security import default_allowed_hosts

    allowed = _split(args.allowed_hosts) or default_allowed_hosts(args.host)
    if allowed and "*" in allowed:
        allowed = None
    return ServiceConfig(graphs_dir=args.graphs_dir, image_root=args.image_root,
                         max_upload_bytes=args.max_upload_bytes, max_pixels=args.max_pixels,
                         max_instances=args.max_instances, memory_budget_mb=args.memory_budget_mb,
                         batch_size=args.batch_size or args.threads, batch_wait_ms=args.batch_wait_ms,
                         batch_timeout_s=args.batch_timeout_s, allowed_hosts=allowed, backend=backend,
                         runtime=_runtime_options(args), keep_versions=args.pinned)


def _runtime_options(args: argparse.Namespace):
    from imageclf.runtimes import RuntimeOptions
    from service.workers import usable_cores

    # The cores this process may use (a --workers parent passes each worker its share as --intra_op_threads).
    cores = args.intra_op_threads or usable_cores()
    threads = min(args.litert_threads, cores)
    return RuntimeOptions(runtime=args.runtime, threads=threads, interpreters=max(1, cores // threads),
                          cache_dir=args.litert_cache_dir or None)


def _run_workers(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    from service.workers import plan_workers, run_workers

    if args.listen_fd >= 0:
        parser.error("--workers cannot be combined with --listen_fd (that is how workers are started)")
    from imageclf.errors import UserError

    # Checked once here, before any worker starts, rather than failing in each of them.
    if not args.backend and not os.path.isdir(args.graphs_dir):
        raise UserError(f"--graphs_dir {args.graphs_dir}: no such folder (run retrain.py first)")
    if not os.path.isdir(args.image_root):
        raise UserError(f"--image_root {args.image_root}: no such folder")
    plan = plan_workers(args.workers, args.memory_budget_mb, args.intra_op_threads, args.inter_op_threads)
    return run_workers(argv, host=args.host, port=args.port, grpc_port=args.grpc_port, plan=plan,
                       grace_s=SHUTDOWN_GRACE_S)


def _tensorflow_threads(intra_op: int, inter_op: int) -> None:
    """Thread pools of this process, for sessions and eager ops alike (0: TensorFlow's default)."""
    if not intra_op and not inter_op:
        return
    import tensorflow as tf

    # Sessions made without a config (GraphModel's) take the eager context's, which these set.
    if intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    if inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)


def _stop_on_signals(stop: threading.Event, server) -> None:
    """SIGTERM (containers, Kubernetes, systemd) and SIGINT (Ctrl-C) start a graceful stop; SIGQUIT, or a
    second SIGINT, stops at once. A repeated SIGTERM does not: under systemd's KillMode=control-group a
    --workers child gets SIGTERM from systemd and once more from its parent, for the same stop."""
    def handler(signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGQUIT or (stop.is_set() and signum == signal.SIGINT):
            raise KeyboardInterrupt
        if stop.is_set():
            print(f"{name} again: already stopping (SIGQUIT or a second Ctrl-C stops at once)", flush=True)
            return
        print(f"{name}: stopping (requests in progress get up to {SHUTDOWN_GRACE_S:g} s)", flush=True)
        stop.set()
        server.pull_trigger()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, handler)


def _backend(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The --backend settings, checked; None without --backend."""
    from imageclf.engine.backend_config import BackendOptions, parse_backend_url

    models = tuple(dict.fromkeys(m.strip() for m in args.backend_models.split(",") if m.strip()))
    if not args.backend:
        if models:
            parser.error("--backend_models needs --backend grpc://HOST:PORT")
        return None
    try:
        parse_backend_url(args.backend)
    except ValueError as e:
        parser.error(f"--backend: {e}")
    if not models:
        parser.error("--backend needs --backend_models NAME[,NAME...]: the models to ask the backend for "
                     "(TensorFlow Serving cannot list them)")
    if args.backend_timeout_s <= 0 or args.backend_max_calls < 0:
        parser.error("--backend_timeout_s must be positive and --backend_max_calls not negative")
    return BackendOptions(url=args.backend, models=models, timeout_s=args.backend_timeout_s,
                          max_calls=args.backend_max_calls or args.threads)


def _grpc_server(args: argparse.Namespace, app):
    """TensorFlow Serving's gRPC API over the app's engine and metrics, with the HTTP side's bounds."""
    from imageclf.errors import UserError
    from service.grpc_api import GrpcServer

    shared = app.extensions["imageclf"]
    try:
        return GrpcServer(shared["engine"], shared["metrics"], host=args.host, port=args.grpc_port,
                          threads=args.threads, max_message_bytes=args.max_upload_bytes + 65536,
                          reuse_port=args.listen_fd >= 0,
                          max_concurrent_rpcs=args.grpc_max_concurrent_rpcs or args.threads + _max_queued(args))
    except OSError as e:
        raise UserError(f"--grpc_port {args.grpc_port}: {e}; pick another port, or 0 to turn gRPC off") from None


def entry_point() -> None:
    """``python -m service`` and the ``imageclf-serve`` command."""
    sys.exit(run("python -m service", main))


if __name__ == "__main__":
    entry_point()
