"""The Open Inference Protocol v2 over HTTP: /v2 routes as KServe and Triton answer them.

JSON requests and responses, and the binary tensor data extension as ``tritonclient.http`` uses
it: an ``Inference-Header-Content-Length`` header says how much of the body is the JSON header;
the rest holds the tensors whose ``parameters.binary_data_size`` is set, in input order (BYTES
as a 4-byte little-endian length then the bytes of each element, FP32 raw little-endian).
Outputs are answered the same way when asked with ``binary_data`` (per output) or
``binary_data_output`` (the request's parameter, for every output).

JSON can only carry BYTES as UTF-8 text, which cannot hold a JPEG: in JSON, encoded images are
base64 text marked with ``parameters: {"content_type": "base64"}``, on the input (as MLServer's
base64 codec marks it) or on the request (tritonclient can only set request parameters).

Errors are ``{"error": "..."}``: 400 for a request that does not fit, 404 for an unknown model
or version, 503 (with Retry-After) when the service is busy or the model not loaded; the body
size limit answers 413, as for uploads. See service/v2_protocol.py for the shared semantics.
"""

from __future__ import annotations

import json

from flask import Blueprint, Response, jsonify, request

from imageclf.engine.classify import Engine
from imageclf.errors import UnavailableError, UnsupportedMediaTypeError, echo
from service import v2_protocol as v2

HEADER_LENGTH = "Inference-Header-Content-Length"
#: Bodies a web page may send cross-site without asking first (see _install_tf_serving_routes).
FORM_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})


def v2_blueprint(engine: Engine) -> Blueprint:
    """The /v2 routes over ``engine``. Their errors are the app's (``imageclf.errors.ServingError``):
    the same JSON ``{"error"}``, statuses and metrics as /v1."""
    bp = Blueprint("v2", __name__, url_prefix="/v2")

    @bp.get("")
    def server_metadata():
        return jsonify(v2.server_metadata())

    @bp.get("/health/live")
    def live():
        return Response(status=200)

    @bp.get("/health/ready")
    def ready():
        if not engine.registry.ready():
            raise UnavailableError(engine.registry.not_ready_reason())
        return Response(status=200)

    @bp.get("/models/<name>/ready")
    @bp.get("/models/<name>/versions/<version>/ready")
    def model_ready(name: str, version: str = ""):
        v2.model_ready(engine, name, v2.parse_version(version))
        return Response(status=200)

    @bp.get("/models/<name>")
    @bp.get("/models/<name>/versions/<version>")
    def model_metadata(name: str, version: str = ""):
        return jsonify(v2.model_metadata(engine, name, v2.parse_version(version)))

    @bp.post("/models/<name>/infer")
    @bp.post("/models/<name>/versions/<version>/infer")
    def infer(name: str, version: str = ""):
        return _infer(engine, name, v2.parse_version(version))

    return bp


def _infer(engine: Engine, name: str, version: int | None) -> Response:
    header, binary = _body()
    with v2.json_reservation(engine, len(header)):
        body = _json(header)
        inputs, outputs, binary_output = _parse(body, binary)
        request_id = body.get("id")
        tensor = v2.compact(engine, v2.one_input(inputs))
        del body, inputs  # the parsed JSON: only the compact input outlives the reservation
    answer = v2.classify(engine, name, version, tensor)
    reply = {"model_name": answer.name, "model_version": str(answer.version)}
    if request_id is not None:
        reply["id"] = request_id
    return _reply(reply, v2.outputs(answer, outputs, binary_output))


def _body() -> tuple[bytes, memoryview]:
    """The JSON header and the binary data after it."""
    raw_length = request.headers.get(HEADER_LENGTH)
    if raw_length is None and request.mimetype in FORM_TYPES:
        # A web page could post these cross-site without asking (a page that sets the header asks first).
        raise UnsupportedMediaTypeError(f"send the request as JSON (Content-Type application/json or none), not "
                                         f"{echo(request.mimetype)}")
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise UnsupportedMediaTypeError("compressed request bodies are not supported: send the request uncompressed")
    body = request.get_data(cache=False)
    if raw_length is None:
        return body, memoryview(b"")
    if not raw_length.strip().isdecimal() or int(raw_length) > len(body):
        raise v2.ProtocolError(f"{HEADER_LENGTH} must be the JSON header's length in bytes, at most the body's "
                               f"{len(body):,}; got '{echo(raw_length)}'")
    length = int(raw_length)
    return body[:length], memoryview(body)[length:]


def _json(header: bytes) -> dict:
    try:
        body = json.loads(header)
    except (ValueError, RecursionError):
        raise v2.ProtocolError("the request header is not valid JSON (or is nested too deeply)") from None
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise v2.ProtocolError('expected a JSON object {"inputs": [{"name", "shape", "datatype", "data"}], ...}')
    if "id" in body and not isinstance(body["id"], str):
        raise v2.ProtocolError("'id' must be a string")
    return body


def _parse(body: dict, binary: memoryview) -> tuple[list[v2.InputTensor], list[v2.OutputRequest], bool]:
    parameters = _parameters(body, "the request")
    default_base64 = _base64(parameters, "the request")
    inputs, at = [], 0
    for i, item in enumerate(body["inputs"]):
        tensor, size = _input(i, item, default_base64)
        if size is not None:
            if at + size > len(binary):
                raise v2.ProtocolError(f"input '{echo(tensor.name)}' has binary_data_size {size:,}, but only "
                                       f"{len(binary) - at:,} bytes of binary data remain")
            tensor.raw, at = binary[at:at + size], at + size
        inputs.append(tensor)
    if at != len(binary):
        raise v2.ProtocolError(f"the body has {len(binary) - at:,} bytes of binary data after the inputs' "
                               "binary_data_size")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise v2.ProtocolError("parameters.binary_data_output must be true or false")
    outputs = _outputs(body.get("outputs", []), binary_output)
    v2.check_outputs(outputs)
    return inputs, outputs, binary_output


def _input(i: int, item: object, default_base64: bool) -> tuple[v2.InputTensor, int | None]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or \
            not isinstance(item.get("datatype"), str):
        raise v2.ProtocolError(f"input {i}: expected {{\"name\", \"shape\", \"datatype\", \"data\"}}")
    name = item["name"]
    parameters = _parameters(item, f"input '{echo(name)}'")
    if "shared_memory_region" in parameters:
        raise v2.ProtocolError("the shared memory extension is not supported: send the data in the request")
    size = parameters.get("binary_data_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise v2.ProtocolError(f"input '{echo(name)}': binary_data_size must be a non-negative integer")
    if size is not None and "data" in item:
        raise v2.ProtocolError(f"input '{echo(name)}' has both 'data' and binary_data_size: give one")
    base64 = _base64(parameters, f"input '{echo(name)}'") if "content_type" in parameters else default_base64
    tensor = v2.InputTensor(name=name, datatype=item["datatype"], shape=v2.check_shape(name, item.get("shape")),
                            data=item.get("data"), base64=base64)
    return tensor, size


def _outputs(items: object, binary_default: bool) -> list[v2.OutputRequest]:
    if not isinstance(items, list):
        raise v2.ProtocolError('\'outputs\' must be a list of {"name", "parameters"}')
    outputs = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise v2.ProtocolError(f"output {i}: expected {{\"name\": ..., \"parameters\": {{...}}}}")
        parameters = _parameters(item, f"output '{echo(item['name'])}'")
        binary, count = parameters.get("binary_data", binary_default), parameters.get("classification", 0)
        if not isinstance(binary, bool) or not isinstance(count, int) or isinstance(count, bool):
            raise v2.ProtocolError(f"output '{echo(item['name'])}': binary_data must be true or false and "
                                   "classification an integer")
        outputs.setdefault(item["name"], v2.OutputRequest(item["name"], count, binary))
    return list(outputs.values())


def _parameters(item: dict, where: str) -> dict:
    parameters = item.get("parameters", {})
    if not isinstance(parameters, dict):
        raise v2.ProtocolError(f"{where}: 'parameters' must be an object")
    return parameters


def _base64(parameters: dict, where: str) -> bool:
    content_type = parameters.get("content_type")
    if content_type not in (None, "base64"):
        raise v2.ProtocolError(f"{where}: content_type must be 'base64' (or none), not '{echo(content_type)}'")
    return content_type == "base64"


def _reply(reply: dict, tensors: list[v2.OutputTensor]) -> Response:
    """JSON, or the JSON header then the binary outputs with Inference-Header-Content-Length."""
    chunks, entries = [], []
    for tensor in tensors:
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if tensor.binary:
            raw = tensor.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = tensor.json_data()
        entries.append(entry)
    reply["outputs"] = entries
    header = json.dumps(reply, separators=(",", ":")).encode()
    if not chunks:
        return Response(header, mimetype="application/json")
    response = Response(b"".join([header, *chunks]), mimetype="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(len(header))
    return response
