"""Routes: classify by path, by upload, the browser page, TF Serving REST, health and metrics."""

from __future__ import annotations

import base64
import binascii
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flask import Flask, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException

from imageclf.batching import MicroBatcher
from imageclf.errors import BadImageError, ImageTooLargeError, NotAnImageError
from imageclf.graph_model import GraphModel
from imageclf.images import DEFAULT_MAX_PIXELS, decode_image
from imageclf.paths import PathEscapeError, confined
from imageclf.registry import ModelRegistry, UnknownModelError
from service.metrics import ServiceMetrics

PAGE = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")


@dataclass(frozen=True)
class ServiceConfig:
    graphs_dir: str = "graphs"
    image_root: str = "."
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    top_k: int = 5
    poll_seconds: float = 1.0
    batch_size: int = 16          # most requests one Session.run may serve together
    batch_wait_ms: float = 2.0    # while another batch runs, how long a new one waits for company


class Batchers:
    """One MicroBatcher per loaded model; forgotten with the model (weak references)."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        self._lock = threading.Lock()
        self._by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def predict(self, model: GraphModel, pixels: np.ndarray) -> np.ndarray:
        with self._lock:
            batcher = self._by_model.get(model)
            if batcher is None:
                batcher = MicroBatcher(model.run, self.config.batch_size, self.config.batch_wait_ms / 1000)
                self._by_model[model] = batcher
        return batcher.submit(model.model_input(pixels))


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def create_app(config: ServiceConfig, registry: ModelRegistry | None = None) -> Flask:
    """A Flask app over ``config.graphs_dir``.

    Without ``registry`` it makes one and starts its poller; a registry passed in is started
    by the caller (after this call, so that its first loads are counted in the metrics).
    """
    metrics = ServiceMetrics()
    own_registry = registry is None
    if own_registry:
        registry = ModelRegistry(config.graphs_dir, config.poll_seconds)
    registry.add_listener(metrics.reloaded)
    if own_registry:
        registry.start()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_upload_bytes
    app.extensions["imageclf"] = {"registry": registry, "metrics": metrics, "config": config,
                                  "batchers": Batchers(config)}
    _install_error_handlers(app, metrics)
    _install_metrics_hooks(app, metrics)
    _install_routes(app, registry, metrics, config)
    return app


def _install_routes(app: Flask, registry: ModelRegistry, metrics: ServiceMetrics, config: ServiceConfig) -> None:
    @app.get("/")
    def index():
        if "file" in request.args:
            return jsonify(_classify_file(registry, config, request.args["file"]))
        if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
            return Response(PAGE, mimetype="text/html")
        raise ApiError(400, "missing 'file' parameter: GET /?file=PATH (under the image root), "
                            "or POST an image to /classify", "missing_parameter")

    @app.post("/")
    @app.post("/classify")
    def classify_upload():
        return jsonify(_classify_bytes(registry, config, _upload_bytes(), _upload_name()))

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "alive"})

    @app.get("/readyz")
    def readyz():
        if not registry.ready():
            return jsonify({"status": "not ready", "error": "no model is loaded"}), 503
        return jsonify({"status": "ready"})

    @app.get("/models")
    def models():
        return jsonify({"models": [entry.describe() for entry in registry.entries()]})

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    _install_tf_serving_routes(app, registry, config)


def _install_tf_serving_routes(app: Flask, registry: ModelRegistry, config: ServiceConfig) -> None:
    """The TensorFlow Serving REST API, for our graphs (inputs as base64 encoded images)."""

    @app.get("/v1/models/<name>")
    def tfs_status(name):
        entry, _ = _model(registry, name)
        return jsonify({"model_version_status": [{"version": str(entry.version), "state": "AVAILABLE",
                                                  "status": {"error_code": "OK", "error_message": ""}}]})

    @app.get("/v1/models/<name>/metadata")
    def tfs_metadata(name):
        entry, model = _model(registry, name)
        height, width = model.input_size
        return jsonify({"model_spec": {"name": name, "signature_name": "", "version": str(entry.version)},
                        "metadata": {"signature_def": {"signature_def": {"serving_default": {
                            "inputs": {"image_bytes": {"dtype": "DT_STRING", "tensor_shape": [-1],
                                                       "name": model.bytes_input.name if model.bytes_input is not None
                                                       else None}},
                            "outputs": {"scores": {"dtype": "DT_FLOAT", "tensor_shape": [-1, len(model.labels)],
                                                   "name": model.output.name}},
                            "method_name": "tensorflow/serving/predict",
                            "image_size": [height, width], "labels": model.labels}}}}})

    @app.post("/v1/models/<name>:predict")
    def tfs_predict(name):
        _, model = _model(registry, name)
        scores = model.predict([_decode(data, config, f"instance {i}") for i, data in enumerate(_instances())])
        return jsonify({"predictions": scores.tolist()})

    @app.post("/v1/models/<name>:classify")
    def tfs_classify(name):
        _, model = _model(registry, name)
        scores = model.predict([_decode(data, config, f"example {i}") for i, data in enumerate(_instances())])
        return jsonify({"results": [[[label, float(s)] for label, s in zip(model.labels, row, strict=True)]
                                    for row in scores]})


def _model(registry: ModelRegistry, name: str | None):
    try:
        return registry.get(name)
    except UnknownModelError as e:
        raise ApiError(404, str(e), "unknown_model") from None


def _classify_file(registry: ModelRegistry, config: ServiceConfig, user_path: str) -> dict:
    if not user_path:
        raise ApiError(400, "empty 'file' parameter", "missing_parameter")
    try:
        path = confined(config.image_root, user_path)
    except PathEscapeError as e:
        raise ApiError(403, f"refused: {e}", "forbidden_path") from None
    if not path.is_file():
        raise ApiError(404, f"no such file under the image root: '{user_path}'", "file_not_found")
    if path.stat().st_size > config.max_upload_bytes:
        raise ApiError(413, f"'{user_path}' is over the {config.max_upload_bytes:,} byte limit", "too_large")
    return _classify_bytes(registry, config, path.read_bytes(), user_path)


def _classify_bytes(registry: ModelRegistry, config: ServiceConfig, data: bytes, name: str) -> dict:
    started = time.perf_counter()
    entry, model = _model(registry, request.args.get("model") or None)
    pixels = _decode(data, config, name)
    decoded = time.perf_counter()
    probabilities = current_app.extensions["imageclf"]["batchers"].predict(model, pixels)
    done = time.perf_counter()
    top_k = _top_k(config)
    return {
        "model": {"name": entry.name, "version": entry.version},
        "image": name,
        "predictions": [{"label": label, "score": score} for label, score in model.top_k(probabilities, top_k)],
        "probabilities": {label: float(p) for label, p in zip(model.labels, probabilities, strict=True)},
        "time_ms": {"decode": round(1000 * (decoded - started), 2), "inference": round(1000 * (done - decoded), 2),
                    "total": round(1000 * (done - started), 2)},
    }


def _top_k(config: ServiceConfig) -> int:
    raw = request.args.get("top_k")
    if raw is None:
        return config.top_k
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ApiError(400, f"top_k must be a positive integer, not '{raw}'", "bad_parameter")
    return value


def _decode(data: bytes, config: ServiceConfig, name: str) -> np.ndarray:
    try:
        return decode_image(data, max_pixels=config.max_pixels, name=name)
    except NotAnImageError as e:
        raise ApiError(415, str(e), "not_an_image") from None
    except ImageTooLargeError as e:
        raise ApiError(400, str(e), "too_many_pixels") from None
    except BadImageError as e:
        raise ApiError(400, str(e), "bad_image") from None


def _upload_bytes() -> bytes:
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("image")
        if upload is None:
            raise ApiError(400, "multipart upload has no 'image' file field", "missing_parameter")
        return upload.read()
    data = request.get_data(cache=False)
    if not data:
        raise ApiError(400, "empty upload: send the image as the body or as a multipart 'image' field",
                       "bad_image")
    return data


def _upload_name() -> str:
    upload = request.files.get("image") if request.mimetype == "multipart/form-data" else None
    return (upload.filename if upload and upload.filename else None) or "upload"


def _instances() -> list[bytes]:
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("instances") or body.get("examples"), list):
        raise ApiError(400, 'expected JSON {"instances": [{"b64": "..."}, ...]}', "bad_request")
    out = []
    for i, item in enumerate(body.get("instances") or body.get("examples")):
        if isinstance(item, dict) and "b64" not in item and len(item) == 1:
            item = next(iter(item.values()))  # {"image_bytes": {"b64": ...}}
        if not isinstance(item, dict) or not isinstance(item.get("b64"), str):
            raise ApiError(400, f'instance {i}: expected {{"b64": "<base64 image>"}}', "bad_request")
        try:
            out.append(base64.b64decode(item["b64"], validate=True))
        except (binascii.Error, ValueError):
            raise ApiError(400, f"instance {i}: invalid base64", "bad_request") from None
    if not out:
        raise ApiError(400, "no instances", "bad_request")
    return out


def _install_error_handlers(app: Flask, metrics: ServiceMetrics) -> None:
    @app.errorhandler(ApiError)
    def api_error(e: ApiError):
        metrics.errors.labels(e.kind).inc()
        return jsonify({"error": e.message}), e.status

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(e.code, "http_error")
        metrics.errors.labels(kind).inc()
        message = {413: f"upload is over the {app.config['MAX_CONTENT_LENGTH']:,} byte limit",
                   405: f"method {request.method} is not allowed on {request.path}",
                   404: f"no such endpoint: {request.path}"}.get(e.code, e.description)
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
