"""Routes: classify by path, by upload, the browser page, TF Serving REST, health and metrics.

A thin skin over ``imageclf.engine.Engine``: parse the request, call the engine, shape JSON.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from flask import Flask, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from imageclf.engine.backend_config import BackendOptions
from imageclf.engine.classify import Answer, Engine, Limits
from imageclf.engine.registry import ModelRegistry
from imageclf.engine.servable import BatchOptions
from imageclf.errors import BadRequestError, ServingError, TooLargeError, echo
from imageclf.images import DEFAULT_MAX_PIXELS
from imageclf.paths import read_confined
from imageclf.runtimes import RuntimeOptions
from service.metrics import ServiceMetrics
from service.security import install_security
from service.tfs_rest import install_routes as install_tf_serving_routes
from service.v2_api import v2_blueprint


@dataclass(frozen=True)
class ServiceConfig:
    graphs_dir: str = "graphs"
    image_root: str = "."
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_instances: int = 64               # images in one TF Serving :predict / :classify request
    memory_budget_mb: int = 1024          # decoded pixels of all in-flight requests together
    top_k: int = 5
    poll_seconds: float = 1.0
    batch_size: int = 8                   # most images one Session.run may serve together
    batch_wait_ms: float = 2.0            # while another batch runs, how long a new one waits for company
    batch_timeout_s: float = 30.0         # how long a request waits for a batch led by another request
    allowed_hosts: tuple[str, ...] | None = field(default=None)  # Host header values accepted; None: any
    backend: BackendOptions | None = None  # forward inference to a gRPC backend instead of loading graphs_dir
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)  # what runs the graphs: tf or litert
    keep_versions: dict[str, set[int]] | None = None  # pinned versions kept loaded beside the newest (registry.py)

    def limits(self) -> Limits:
        return Limits(max_pixels=self.max_pixels, max_instances=self.max_instances,
                      memory_budget_bytes=self.memory_budget_mb << 20)

    def batching(self) -> BatchOptions:
        return BatchOptions(max_batch=self.batch_size, max_wait_ms=self.batch_wait_ms,
                            timeout_s=self.batch_timeout_s)


#: Parts a multipart upload may have (Flask's default): parsing stops at the next one.
MAX_FORM_PARTS = 1000


def create_app(config: ServiceConfig, registry: ModelRegistry | None = None,
               start_registry: bool = True) -> Flask:
    """A Flask app over ``config.graphs_dir``, or over the models of ``config.backend``.

    Without ``registry`` it makes one and, unless ``start_registry`` is False, starts it (loads
    the models, polls the folder); a registry passed in, or one not started here, is started by
    the caller (``app.extensions["imageclf"]["registry"].start()``), e.g. once its ports are bound.
    """
    metrics = ServiceMetrics()
    own_registry = registry is None
    if own_registry and config.backend is not None:
        from imageclf.engine.remote import remote_registry  # TensorFlow Serving's protos: loaded only here

        registry = remote_registry(config.backend, config.batching(), on_call=metrics.backend_call)
    elif own_registry:
        registry = ModelRegistry(config.graphs_dir, config.poll_seconds, batching=config.batching(),
                                 runtime=config.runtime, keep_versions=config.keep_versions)
    registry.add_listener(metrics.reloaded)
    if own_registry and start_registry:
        registry.start()
    engine = Engine(registry, config.limits())
    metrics.watch_budget(engine.budget)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_upload_bytes
    app.config["MAX_FORM_PARTS"] = MAX_FORM_PARTS
    # A text field may be as large as the upload (no field is kept): a 413 from parsing a form
    # that is within the byte limit then always means too many parts, and can say so.
    app.config["MAX_FORM_MEMORY_SIZE"] = config.max_upload_bytes
    app.extensions["imageclf"] = {"registry": registry, "metrics": metrics, "config": config, "engine": engine}
    install_security(app, config.allowed_hosts)
    _install_error_handlers(app, metrics)
    _install_metrics_hooks(app, metrics)
    _install_routes(app, engine, metrics, config)
    install_tf_serving_routes(app, engine)  # TensorFlow Serving's REST API: tfs_rest.py
    app.register_blueprint(v2_blueprint(engine))  # Open Inference Protocol v2: docs/v2-protocol.md
    return app


def _install_routes(app: Flask, engine: Engine, metrics: ServiceMetrics, config: ServiceConfig) -> None:
    page = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")

    @app.get("/")
    def index():
        if "file" in request.args:
            answer_format = _answer_format()  # checked before any work
            return jsonify(_formatted(_classify_file(engine, config, request.args["file"]), answer_format))
        if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
            return Response(page, mimetype="text/html")
        raise BadRequestError("missing 'file' parameter: GET /?file=PATH (under the image root), "
                              "or POST an image to /classify", kind="missing_parameter")

    @app.post("/")
    @app.post("/classify")
    def classify_upload():
        answer_format = _answer_format()
        data, name = _upload()
        return jsonify(_formatted(_classify(engine, config, data, name), answer_format))

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "alive"})

    @app.get("/readyz")
    def readyz():
        if not engine.registry.ready():
            return jsonify({"status": "not ready", "error": engine.registry.not_ready_reason()}), 503
        return jsonify({"status": "ready"})

    @app.get("/models")
    def models():
        return jsonify({"models": [status.describe() for status in engine.registry.statuses()]})

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)


def _classify_file(engine: Engine, config: ServiceConfig, user_path: str) -> dict:
    if not user_path:
        raise BadRequestError("empty 'file' parameter", kind="missing_parameter")
    data = read_confined(config.image_root, user_path, config.max_upload_bytes)  # PathError: 400/403/404/413
    return _classify(engine, config, data, user_path)


def _classify(engine: Engine, config: ServiceConfig, data: bytes, name: str) -> dict:
    started = time.perf_counter()
    top_k = _top_k(config)
    answer = engine.classify([data], request.args.get("model") or None, names=[name])
    return _one_answer(answer, name, top_k, time.perf_counter() - started)


def _one_answer(answer: Answer, name: str, top_k: int, seconds: float) -> dict:
    return {
        "model": {"name": answer.name, "version": answer.version},
        "image": name,
        "predictions": [{"label": label, "score": score} for label, score in answer.top_k(0, top_k)],
        "probabilities": {label: float(p) for label, p in zip(answer.labels, answer.scores[0], strict=True)},
        "time_ms": {"decode": round(answer.decode_ms, 2), "inference": round(answer.inference_ms, 2),
                    "total": round(1000 * seconds, 2)},
    }


#: ``?format=`` values: the full answer (default), or the older service's ``[[labels...], [probs...]]``.
ANSWER_FORMATS = ("full", "lists")


def _answer_format() -> str:
    value = request.args.get("format", ANSWER_FORMATS[0])
    if value not in ANSWER_FORMATS:
        raise BadRequestError(f"unknown format '{echo(value)}': use 'full' (the default) or 'lists' "
                              "([[labels...], [probabilities...]], highest first, top_k of them)", kind="bad_parameter")
    return value


def _formatted(answer: dict, answer_format: str) -> dict | list:
    """The answer in the format asked for; ``lists`` is what clients of the older service read."""
    if answer_format == "lists":
        top = answer["predictions"]
        return [[p["label"] for p in top], [p["score"] for p in top]]
    return answer


def _top_k(config: ServiceConfig) -> int:
    raw = request.args.get("top_k")
    if raw is None:
        return config.top_k
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise BadRequestError(f"top_k must be a positive integer, not '{echo(raw)}'", kind="bad_parameter")
    return value


def _upload() -> tuple[bytes, str]:
    if request.mimetype == "multipart/form-data":
        upload = _form_file("image")
        if upload is None:
            raise BadRequestError("multipart upload has no 'image' file field", kind="missing_parameter")
        return upload.read(), upload.filename or "upload"
    data = request.get_data(cache=False)
    if not data:
        raise BadRequestError("empty upload: send the image as the body or as a multipart 'image' field",
                              kind="bad_image")
    return data, "upload"


def _form_file(name: str):
    """The file field ``name`` of a multipart upload, or None; 413 naming the limit a form is over."""
    try:
        return request.files.get(name)
    except RequestEntityTooLarge:
        length, limit = request.content_length, current_app.config["MAX_CONTENT_LENGTH"]
        if length is not None and length <= limit:
            raise TooLargeError(f"multipart upload has more than {MAX_FORM_PARTS:,} parts: send the image as "
                                f"one '{name}' file field", kind="too_many_parts") from None
        raise


def _install_error_handlers(app: Flask, metrics: ServiceMetrics) -> None:
    @app.errorhandler(ServingError)
    def serving_error(e: ServingError):
        """Every route's typed errors, /v1, TF Serving REST and /v2 alike: the class says the status."""
        metrics.errors.labels(e.kind).inc()
        response = jsonify({"error": str(e)})
        response.status_code = e.http_status
        if e.retry:
            response.headers["Retry-After"] = "1"
        return response

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(e.code, "http_error")
        metrics.errors.labels(kind).inc()
        message = {413: f"upload is over the {app.config['MAX_CONTENT_LENGTH']:,} byte limit",
                   405: f"method {echo(request.method)} is not allowed on {echo(request.path)}",
                   404: f"no such endpoint: {echo(request.path)}"}.get(e.code, e.description)
        return jsonify({"error": message}), e.code

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        app.logger.exception("unexpected error")
        metrics.errors.labels("internal").inc()
        return jsonify({"error": f"internal error: {type(e).__name__}"}), 500


def _install_metrics_hooks(app: Flask, metrics: ServiceMetrics) -> None:
    @app.before_request
    def start_timer():
        request.environ["imageclf.started"] = time.perf_counter()

    @app.after_request
    def record(response):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        started = request.environ.get("imageclf.started")
        if started is not None:
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response
