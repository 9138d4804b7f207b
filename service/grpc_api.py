"""TensorFlow Serving's gRPC API (``PredictionService``, ``ModelService``) over the engine.

A thin skin like app.py: read the request (tfs_protos), call ``imageclf.engine.Engine`` (so
limits, batching, the decode budget and hot reload are the HTTP path's), shape the answer.
Errors become gRPC status codes, never a traceback; every call is counted in the service's
Prometheus metrics under its method path (``/tensorflow.serving.PredictionService/Predict``)
with the status code name.

Methods are registered from the services' descriptors with the official request and response
messages, but requests are parsed inside the handler: bytes that are not a valid message are
then INVALID_ARGUMENT (and counted), where gRPC's own parsing would answer INTERNAL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2,
    predict_pb2,
    prediction_service_pb2,
)

from imageclf.engine.classify import Engine
from imageclf.engine.signatures import DEFAULT_SIGNATURE, signature_named, signatures
from imageclf.errors import ServingError, UnimplementedError, echo, echo_list
from service import tfs_protos as protos
from service import v2_grpc
from service.metrics import ServiceMetrics
from service.tfs_model import version_status

log = logging.getLogger(__name__)

PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"]
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"]
UNSUPPORTED = {
    "Regress": "Regress is not supported: these models are classifiers (use Predict or Classify)",
    "MultiInference": "MultiInference is not supported: send one Predict or Classify per model",
    "HandleReloadConfigRequest": "HandleReloadConfigRequest is not supported: the service serves every graph "
                                 "in --graphs_dir and reloads them when the files change",
}

Code = grpc.StatusCode
#: The longest error text sent back: it travels in the trailers, and clients refuse more than
#: 8-16 KB of metadata (they would see a transport error instead of the real one).
MAX_DETAILS_CHARS = 2000
class _Calls:
    """Runs one RPC's handler: errors to status codes, and the call counted in the metrics."""

    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics

    def run(self, method: str, handler: Callable, request_type, data: bytes, context: grpc.ServicerContext):
        started = time.perf_counter()
        try:
            response = handler(_parsed(request_type, data))
        except Exception as e:  # noqa: BLE001 - every failure must become a status, never a traceback
            code, kind, message = _failure(e)
            self.metrics.errors.labels(kind).inc()
            self._record(method, code, started)
            context.abort(code, echo(message, MAX_DETAILS_CHARS))
        self._record(method, Code.OK, started)
        return response

    def _record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        self.metrics.requests.labels(method, code.name).inc()
        self.metrics.latency.labels(method).observe(time.perf_counter() - started)


def _parsed(request_type, data: bytes):
    if request_type is None:  # an unimplemented method: nothing to read
        return data
    request = request_type()
    try:
        request.ParseFromString(data)
    except DecodeError:
        raise protos.RequestError(f"the request is not a valid {request_type.DESCRIPTOR.full_name} message") from None
    return request


def _failure(error: Exception) -> tuple[grpc.StatusCode, str, str]:
    """A handler's error as its status code (declared by the error's class), metrics kind and text."""
    if isinstance(error, ServingError):
        return Code[error.grpc_code], error.kind, str(error)
    log.error("unexpected error in a gRPC call", exc_info=error)
    return Code.INTERNAL, "internal", f"internal error: {type(error).__name__}"


class PredictionHandlers:
    """PredictionService's methods, request message in, response message out."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def methods(self) -> dict[str, tuple[type, Callable]]:
        return {"Predict": (predict_pb2.PredictRequest, self._predict),
                "Classify": (classification_pb2.ClassificationRequest, self._classify),
                "GetModelMetadata": (get_model_metadata_pb2.GetModelMetadataRequest, self._metadata)}

    def _predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        name, version = protos.requested_model(request.model_spec)
        signature = signature_named(request.model_spec.signature_name)
        wanted = protos.wanted_outputs(request.output_filter, signature)
        tensor = protos.input_tensor(request.inputs, signature)
        shape = protos.tensor_shape(tensor)
        if signature.takes_pixels:
            answer = self.engine.classify_pixels(shape, lambda: protos.float_array(tensor, shape), name, version)
        else:  # the engine checks the count before any decoding
            answer = self.engine.classify(protos.string_values(tensor, signature.input.key), name, version=version)
        return predict_pb2.PredictResponse(model_spec=protos.reply_spec(answer.name, answer.version, signature.name),
                                           outputs=protos.output_tensors(answer, wanted))

    def _classify(self, request: classification_pb2.ClassificationRequest):
        name, version = protos.requested_model(request.model_spec)
        signature = signature_named(request.model_spec.signature_name)
        if signature.name != DEFAULT_SIGNATURE:
            raise protos.RequestError(f"Classify reads encoded images from tf.Example: use the signature "
                                      f"'{DEFAULT_SIGNATURE}' (or none), not '{signature.name}'")
        answer = self.engine.classify(protos.example_images(request.input), name, version=version)
        return classification_pb2.ClassificationResponse(
            model_spec=protos.reply_spec(answer.name, answer.version, signature.name),
            result=protos.classification_result(answer))

    def _metadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest):
        name, version = protos.requested_model(request.model_spec)
        fields = set(request.metadata_field)
        if fields != {"signature_def"}:
            raise protos.RequestError("metadata_field must be ['signature_def'], the metadata served here; "
                                      f"got {echo_list(sorted(fields)) if fields else 'none'}")
        with self.engine.hold(name, version) as servable:
            definitions, version = protos.signature_def_map(signatures(servable.model)), servable.version
        response = get_model_metadata_pb2.GetModelMetadataResponse(model_spec=protos.reply_spec(name, version))
        response.metadata["signature_def"].Pack(definitions)
        return response


class ModelHandlers:
    """ModelService's methods."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def methods(self) -> dict[str, tuple[type, Callable]]:
        return {"GetModelStatus": (get_model_status_pb2.GetModelStatusRequest, self._status)}

    def _status(self, request: get_model_status_pb2.GetModelStatusRequest):
        name, version = protos.requested_model(request.model_spec)
        return get_model_status_pb2.GetModelStatusResponse(
            model_version_status=[protos.version_status(version_status(self.engine, name, version))])


def _service(service, methods: dict[str, tuple[type, Callable]], calls: _Calls) -> grpc.GenericRpcHandler:
    """Every method of ``service`` (a descriptor): those in ``methods``, the others UNIMPLEMENTED."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            continue  # not registered: gRPC answers UNIMPLEMENTED (ModelStreamInfer)
        request_type, handler = methods.get(method.name) or (None, _unimplemented(
            UNSUPPORTED.get(method.name, f"{method.name} is not supported by this service")))
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _behaviour(calls, f"/{service.full_name}/{method.name}", request_type, handler),
            response_serializer=lambda response: response.SerializeToString())
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _behaviour(calls: _Calls, path: str, request_type, handler: Callable) -> Callable:
    def behaviour(data: bytes, context: grpc.ServicerContext):
        return calls.run(path, handler, request_type, data, context)
    return behaviour


def _unimplemented(message: str) -> Callable:
    def handler(request):
        raise UnimplementedError(message)
    return handler


class GrpcServer:
    """The gRPC API on ``host:port`` (0: any free port; see ``.port``), with bounded resources.

    - ``threads`` handler threads (one RPC each), like waitress' ``--threads``;
    - at most ``max_concurrent_rpcs`` RPCs in progress or queued; more are refused at once
      with RESOURCE_EXHAUSTED;
    - messages over ``max_message_bytes`` are refused by gRPC with RESOURCE_EXHAUSTED before
      a handler sees them.
    """

    def __init__(self, engine: Engine, metrics: ServiceMetrics, *, host: str, port: int, threads: int,
                 max_message_bytes: int, max_concurrent_rpcs: int, reuse_port: bool = False):
        self._executor = futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc-handler")
        self._server = grpc.server(self._executor, maximum_concurrent_rpcs=max_concurrent_rpcs, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            # Off, or a second service on the same port would share it silently; on for --workers,
            # whose parent holds the port (service/workers.py).
            ("grpc.so_reuseport", int(reuse_port)),
        ])
        calls = _Calls(metrics)
        self._server.add_generic_rpc_handlers((
            _service(PREDICTION_SERVICE, PredictionHandlers(engine).methods(), calls),
            _service(MODEL_SERVICE, ModelHandlers(engine).methods(), calls),
            _service(v2_grpc.SERVICE, v2_grpc.V2Handlers(engine).methods(), calls)))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if not self.port:
            self._executor.shutdown()
            raise OSError(f"cannot listen for gRPC on {address} (is the port in use?)")

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float = 5.0) -> None:
        """Refuse new RPCs, let running ones finish for up to ``grace`` seconds, free every thread."""
        self._server.stop(grace).wait()
        self._executor.shutdown(wait=True)
