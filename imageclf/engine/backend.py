"""A client of a TensorFlow Serving gRPC backend, with the official ``tensorflow-serving-api`` stubs.

The backend is TensorFlow Serving running a SavedModel from ``retrain.py --saved_model_dir``, or
another ``python -m service``: both answer ``ModelService.GetModelStatus``,
``PredictionService.GetModelMetadata`` and ``Predict`` on the ``predict_images`` signature
(float32 ``[n, H, W, 3]`` in [0, 1] -> ``scores`` and ``classes``).

One long-lived channel per backend; every call has a deadline and takes one of a bounded number
of call slots. gRPC failures become the engine's typed errors, so front ends answer them as they
answer everything else (HTTP 503 with Retry-After for an unreachable or slow backend, 404 for a
model it does not serve, 502 for anything else), never a traceback. A refusal (INVALID_ARGUMENT) is
never the client's fault here, since the front makes every request to the backend's own metadata:
remote.py answers it 503 (the metadata is fetched again) or, when the fresh metadata is refused, 502.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from imageclf.engine.classify import ModelNotFoundError
from imageclf.engine.signatures import CLASSES, DEFAULT_SIGNATURE, PIXELS_SIGNATURE, SCORES
from imageclf.errors import BadGatewayError, BusyError, ServingError, UnavailableError

log = logging.getLogger(__name__)

#: The largest request sent in one call. gRPC servers refuse bigger messages unless configured
#: otherwise (4 MiB is gRPC's default receive limit), so a batch is split to stay under it.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_MESSAGE_OVERHEAD = 64 * 1024
#: Bounds on what a backend may declare, so that a broken or hostile one cannot make the front
#: allocate without limit: the side of a model's input (a 100000x100000 input would take 120 GB
#: for the warm-up picture alone) and the number of classes in an answer.
MAX_INPUT_SIDE = 2048
MAX_CLASSES = 100_000
#: At most one warning a minute for each (method, status code): a backend that stays away would
#: otherwise log one line for every status poll and every request.
LOG_EVERY_S = 60.0
Code = grpc.StatusCode


class BackendUnavailableError(UnavailableError):
    """The backend could not be reached or is overloaded: retry shortly."""

    kind = "backend_unavailable"


class BackendUnreachableError(BackendUnavailableError):
    """The backend could not be reached at all (gRPC UNAVAILABLE), as opposed to busy or overloaded."""


class BackendTimeoutError(UnavailableError):
    """The backend did not answer within the deadline."""

    kind = "backend_timeout"


class BackendBusyError(BusyError):
    """Every call slot stayed taken for the whole deadline."""

    kind = "backend_busy"


class BackendRejectedError(BadGatewayError):
    """The backend refused the request as invalid (INVALID_ARGUMENT). What we send it is made from its own
    metadata, so this is not the client's fault: remote.py turns it into a 503 (fetch the metadata again)
    or a 502 before any client sees it (see the module doc)."""

    kind = "backend_invalid_argument"


class BackendFailedError(BadGatewayError):
    """The backend failed otherwise, or answered something other than our export's contract."""

    kind = "backend_error"


@dataclass(frozen=True)
class ModelState:
    """What GetModelStatus says of a model: its newest AVAILABLE version, or why there is none."""

    available: bool
    version: int | None
    state: str                  # "ready", "loading" or "failed" (TF Serving: AVAILABLE, START/LOADING, END...)
    error: str | None = None


@dataclass(frozen=True)
class ModelSignature:
    """What GetModelMetadata tells about serving a model's ``predict_images``."""

    version: int
    input_size: tuple[int, int]
    input_name: str             # the backend's tensor names, as its SignatureDefs give them
    output_name: str
    bytes_input_name: str | None


@dataclass(frozen=True)
class Prediction:
    version: int
    labels: tuple[str, ...]     # the ``classes`` output: every label, in score order
    scores: np.ndarray          # [n, classes]


class BackendClient:
    """Calls to one backend over one channel; at most ``max_calls`` at once, each within ``timeout_s``.

    ``on_call(method, code_name, seconds)`` is told of every call that was made (for metrics).
    """

    def __init__(self, target: str, *, timeout_s: float = 5.0, max_calls: int = 8,
                 on_call: Callable[[str, str, float], None] | None = None):
        self.target = target
        self.timeout_s = timeout_s
        self._slots = threading.BoundedSemaphore(max_calls)
        self._on_call = on_call
        self._log = _LogLimiter(LOG_EVERY_S)
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", -1),  # one image bigger than MAX_MESSAGE_BYTES still goes alone
            # Pings only while calls are in flight (servers refuse frequent idle pings), to find a dead
            # peer behind a silent network; an idle dead connection is found by the status poll's deadline.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 0),
            # Reconnect soon after a restarted backend comes back (gRPC's default backoff grows to 120 s).
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ])
        self._prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def status(self, model: str) -> ModelState:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model
        response = self._call("GetModelStatus", self._models.GetModelStatus, request)
        return _model_state(model, response.model_version_status)

    def signature(self, model: str) -> ModelSignature:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = model
        response = self._call("GetModelMetadata", self._prediction.GetModelMetadata, request)
        definitions = get_model_metadata_pb2.SignatureDefMap()
        if "signature_def" not in response.metadata or not response.metadata["signature_def"].Unpack(definitions):
            raise BackendFailedError(f"the backend gave no signature_def metadata for model {model}")
        return _pixel_signature(model, response.model_spec.version.value, definitions.signature_def)

    def predict(self, model: str, images: np.ndarray) -> Prediction:
        """Scores for float32 ``[n, H, W, 3]`` pixels in [0, 1], through ``predict_images``."""
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = PIXELS_SIGNATURE
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.asarray(images, np.float32)))
        response = self._call("Predict", self._prediction.Predict, request)
        return _prediction(model, len(images), response)

    @staticmethod
    def images_per_call(input_size: tuple[int, int]) -> int:
        """The most images of this size that one Predict carries under MAX_MESSAGE_BYTES (at least one)."""
        return max(1, (MAX_MESSAGE_BYTES - _MESSAGE_OVERHEAD) // (4 * 3 * input_size[0] * input_size[1]))

    @staticmethod
    def rows_per_answer(labels: Sequence[str]) -> int:
        """The most rows of scores and labels one answer carries under MAX_MESSAGE_BYTES (at least one):
        each label is in every row, so many long labels would push a big batch's answer over the limit."""
        row = sum(4 + 4 + len(label.encode("utf-8")) for label in labels)  # a float; a string, its tag and length
        return max(1, (MAX_MESSAGE_BYTES - _MESSAGE_OVERHEAD) // max(1, row))

    def _call(self, method: str, stub_method, request):
        if not self._slots.acquire(timeout=self.timeout_s):
            raise BackendBusyError(f"the model backend is busy: no call slot for {self.timeout_s:g} s; retry shortly")
        started, code = time.perf_counter(), Code.OK
        try:
            return stub_method(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else Code.UNKNOWN
            details = (e.details() if isinstance(e, grpc.Call) else str(e)) or code.name
            error = _mapped(method, code, details, request.model_spec.name, self.timeout_s)
            if isinstance(error, BackendUnavailableError | BackendFailedError):
                self._log.warning((method, code.name), "backend %s failed: %s: %s", method, code.name, details)
            raise error from None
        except ValueError:  # grpc's "Cannot invoke RPC on closed channel!": the service is stopping
            code = Code.CANCELLED
            raise BackendUnavailableError("the model backend connection is closed (stopping)") from None
        finally:
            self._slots.release()
            if self._on_call is not None:
                self._on_call(method, code.name, time.perf_counter() - started)


class _LogLimiter:
    """At most one line per ``every_s`` seconds for each key; the next line counts those left out."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._lock = threading.Lock()
        self._seen: dict[tuple, tuple[float, int]] = {}  # key -> (when last logged, lines left out since)

    def warning(self, key: tuple, message: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            last, left_out = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.every_s:
                self._seen[key] = (last, left_out + 1)
                return
            self._seen[key] = (now, 0)
        if left_out:
            message, args = message + " (and %d more like it since the last such line)", (*args, left_out)
        log.warning(message, *args)


def _mapped(method: str, code: grpc.StatusCode, details: str, model: str, timeout_s: float) -> ServingError:
    """A failed call as the engine's error. Unavailability is told without the backend's own words,
    which name internal addresses; refusals keep them, since they are about the request."""
    if code == Code.DEADLINE_EXCEEDED:
        return BackendTimeoutError(f"the model backend did not answer within {timeout_s:g} s; retry shortly")
    if code == Code.RESOURCE_EXHAUSTED and "Received message larger than max" in details:
        # gRPC's own receive limit, here: the same call would fail again, so it is not retryable.
        return BackendFailedError(f"the model backend's answer on {method} for model '{model}' is over "
                                  f"the {MAX_MESSAGE_BYTES >> 20} MiB message limit")
    if code == Code.UNAVAILABLE:
        return BackendUnreachableError(f"the model backend is unavailable ({code.name}); retry shortly")
    if code in (Code.CANCELLED, Code.ABORTED, Code.RESOURCE_EXHAUSTED):
        return BackendUnavailableError(f"the model backend is unavailable ({code.name}); retry shortly")
    if code == Code.NOT_FOUND:
        return ModelNotFoundError(f"model '{model}' is not served by the backend: {details}")
    if code == Code.INVALID_ARGUMENT:
        return BackendRejectedError(f"the model backend refused the request: {details}")
    return BackendFailedError(f"the model backend failed ({code.name}) on {method} for model '{model}'")


def _model_state(model: str, versions) -> ModelState:
    state_enum = get_model_status_pb2.ModelVersionStatus
    available = [v.version for v in versions if v.state == state_enum.AVAILABLE]
    if available:
        return ModelState(True, max(available), "ready")
    if any(v.state in (state_enum.START, state_enum.LOADING) for v in versions):
        return ModelState(False, None, "loading")
    errors = [v.status.error_message for v in versions if v.status.error_message]
    return ModelState(False, None, "failed", errors[0] if errors else f"model '{model}' has no available version")


def _pixel_signature(model: str, version: int, definitions) -> ModelSignature:
    wanted = (f"model '{model}' on the backend has no '{PIXELS_SIGNATURE}' signature taking float32 images "
              f"[n, height, width, 3] and answering '{SCORES}' and '{CLASSES}' (serve a SavedModel written by "
              "retrain.py --saved_model_dir)")
    if PIXELS_SIGNATURE not in definitions:
        raise BackendFailedError(wanted)
    signature = definitions[PIXELS_SIGNATURE]
    images = signature.inputs.get("images")
    dims = [d.size for d in images.tensor_shape.dim] if images is not None else []
    if (images is None or images.dtype != tf.float32.as_datatype_enum or len(dims) != 4 or dims[3] != 3
            or min(dims[1:3]) <= 0 or not {SCORES, CLASSES} <= set(signature.outputs)):
        raise BackendFailedError(wanted)
    if max(dims[1:3]) > MAX_INPUT_SIDE:
        raise BackendFailedError(f"model '{model}' on the backend declares an input of {dims[1]}x{dims[2]} pixels; "
                                 f"the front takes at most {MAX_INPUT_SIDE} pixels a side")
    encoded = definitions[DEFAULT_SIGNATURE].inputs.get("image_bytes") if DEFAULT_SIGNATURE in definitions else None
    return ModelSignature(version=version, input_size=(dims[1], dims[2]), input_name=images.name,
                          output_name=signature.outputs[SCORES].name,
                          bytes_input_name=encoded.name if encoded is not None else None)


def _prediction(model: str, n: int, response: predict_pb2.PredictResponse) -> Prediction:
    if SCORES not in response.outputs or CLASSES not in response.outputs:
        raise BackendFailedError(f"the backend answered model '{model}' without '{SCORES}' and '{CLASSES}'")
    broken = (f"the backend's answer for model '{model}' is not one row of finite scores per image with the "
              f"same labels (at most {MAX_CLASSES:,}, all different) in every row")
    scores_proto, classes_proto = response.outputs[SCORES], response.outputs[CLASSES]
    # Checked on the message before numpy sees it: tf.make_ndarray fills a declared shape from
    # one value (or none), so a small answer could otherwise make a huge array.
    if not (_dense(scores_proto, n, tf.float32) and _dense(classes_proto, n, tf.string)):
        raise BackendFailedError(broken)
    scores = tf.make_ndarray(scores_proto)
    classes = tf.make_ndarray(classes_proto)
    # Our export's contract: every row of ``classes`` is the label list, in the order of the scores.
    if not (classes.shape == scores.shape and np.isfinite(scores).all() and (classes == classes[:1]).all()
            and len(set(classes[0])) == len(classes[0])):
        raise BackendFailedError(broken)
    labels = tuple(c.decode("utf-8", "replace") for c in classes[0])
    return Prediction(version=response.model_spec.version.value, labels=labels, scores=scores)


def _dense(tensor, rows: int, dtype: tf.DType) -> bool:
    """Whether ``tensor`` is ``[rows, k]`` of ``dtype``, 1 <= k <= MAX_CLASSES, with every value in the message."""
    dims = [d.size for d in tensor.tensor_shape.dim]
    if tensor.dtype != dtype.as_datatype_enum or len(dims) != 2 or dims[0] != rows or not 0 < dims[1] <= MAX_CLASSES:
        return False
    if tensor.tensor_content:
        return dtype != tf.string and len(tensor.tensor_content) == dtype.size * rows * dims[1]
    values = tensor.string_val if dtype == tf.string else tensor.float_val
    return len(values) == rows * dims[1]
