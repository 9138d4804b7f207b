"""TensorFlow Serving's REST API (``/v1/models/...``), answered as TF Serving answers for our SavedModel.

A client written against TF Serving running ``retrain.py --saved_model_dir``'s export works
unchanged here, and back: the same routes (with ``/versions/V`` or ``/labels/L``), request
formats (row ``instances`` and columnar ``inputs``, ``signature_name``), answer shapes (a
signature with several outputs answers one object per row, or an object of columns; with one
output, bare values), metadata and status JSON (see tfs_model), and ``{"error": ...}`` bodies
with TF Serving's status codes: 400 for a bad request, 404 for an unknown model or version,
503 when nothing can be served now. ``:classify`` answers too, though the export has no
classify signature (TF Serving would refuse it): it is this service's, kept for its clients.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

import numpy as np
from flask import Flask, jsonify, request

from imageclf.engine.classify import Answer, Engine
from imageclf.engine.signatures import (
    CLASSES,
    DEFAULT_SIGNATURE,
    IMAGE_FEATURES,
    SCORES,
    Signature,
    signature_named,
    signatures,
)
from imageclf.errors import BadRequestError, UnsupportedMediaTypeError, echo, echo_list
from service.tfs_model import check_label, signature_def_map_json, version_status

#: Model versions are int64, as in TF Serving's ModelSpec.
MAX_VERSION = 2**63 - 1
#: How a URL names the version: not at all (the served one), by number, or by label.
VERSION_PARTS = {"": "", "/versions/<version>": "_version", "/labels/<label>": "_label"}
ROW, COLUMNAR = "instances", "inputs"


def install_routes(app: Flask, engine: Engine) -> None:
    """Status, metadata, ``:predict``, ``:classify`` and ``:regress``, under each way of naming the version."""
    views = {"": (["GET"], _status_view(engine)), "/metadata": (["GET"], _metadata_view(engine)),
             ":predict": (["POST"], _predict_view(engine)), ":classify": (["POST"], _classify_view(engine)),
             ":regress": (["POST"], _regress_view(engine))}
    for part, suffix in VERSION_PARTS.items():
        for verb, (methods, view) in views.items():
            endpoint = "tfs_" + (verb.strip("/:") or "status") + suffix
            app.add_url_rule(f"/v1/models/<name>{part}{verb}", endpoint, view, methods=methods)


def _status_view(engine: Engine):
    def status(name: str, version: str | None = None, label: str | None = None):
        name, number = _model_spec(name, version, label)
        return jsonify({"model_version_status": [version_status(engine, name, number).as_json()]})
    return status


def _metadata_view(engine: Engine):
    def metadata(name: str, version: str | None = None, label: str | None = None):
        name, number = _model_spec(name, version, label)
        with engine.hold(name, number) as servable:
            definitions, served = signature_def_map_json(signatures(servable.model)), servable.version
        return jsonify({"model_spec": {"name": name, "signature_name": "", "version": str(served)},
                        "metadata": {"signature_def": {"signature_def": definitions}}})
    return metadata


def _predict_view(engine: Engine):
    def predict(name: str, version: str | None = None, label: str | None = None):
        name, number = _model_spec(name, version, label)
        body = _json_body()
        signature = _signature(body)
        layout = _layout(body)
        answer = _run(engine, signature, _batch(layout, body[layout], signature.input.key), name, number)
        outputs = output_values(answer, signature)
        return jsonify({"predictions": as_rows(outputs)} if layout == ROW else {"outputs": as_columns(outputs)})
    return predict


def _classify_view(engine: Engine):
    def classify(name: str, version: str | None = None, label: str | None = None):
        name, number = _model_spec(name, version, label)
        body = _json_body()
        signature = _signature(body)
        if signature.name != DEFAULT_SIGNATURE:
            raise BadRequestError(f":classify reads encoded images: use the signature '{DEFAULT_SIGNATURE}' (or none), "
                                  f"not '{signature.name}'")
        answer = engine.classify(_classify_images(engine, body), name, version=number)
        return jsonify({"results": [[[label, float(s)] for label, s in zip(answer.labels, row, strict=True)]
                                    for row in answer.scores]})
    return classify


def _regress_view(engine: Engine):
    def regress(name: str, version: str | None = None, label: str | None = None):
        name, number = _model_spec(name, version, label)
        with engine.hold(name, number):  # an unknown model or version is 404 first, as in TF Serving
            pass
        raise BadRequestError("Expected regression signature method_name to be tensorflow/serving/regress. "
                              "Was: tensorflow/serving/predict (these models are classifiers: use :predict or "
                              ":classify)")
    return regress


def _model_spec(name: str, version: str | None, label: str | None) -> tuple[str, int | None]:
    """The model and version a URL names; a label names the served version (None)."""
    if label is not None:
        check_label(label)
        return name, None
    if version is None:
        return name, None
    if not re.fullmatch(r"[0-9]+", version):
        raise BadRequestError(f"Malformed request: the version in /versions/{echo(version)} must be a number")
    if int(version) > MAX_VERSION:
        raise BadRequestError(f"Failed to convert version: {echo(version)} to numeric.")
    return name, int(version)


def _json_body() -> dict:
    if not request.is_json:
        # Only JSON bodies: a web page can send text/plain or form bodies cross-site without asking.
        raise UnsupportedMediaTypeError("send the request body as JSON with 'Content-Type: application/json'")
    try:
        body = json.loads(request.get_data(cache=False))
    except (ValueError, RecursionError):
        raise BadRequestError("the request body is not valid JSON (or is nested too deeply)") from None
    if not isinstance(body, dict):
        raise BadRequestError('the request body must be a JSON object: {"instances": [{"b64": "..."}, ...]}')
    return body


def _signature(body: dict) -> Signature:
    name = body.get("signature_name", "")
    if not isinstance(name, str):
        raise BadRequestError("'signature_name' key must be a string value.")
    return signature_named(name)


def _layout(body: dict) -> str:
    present = [key for key in (ROW, COLUMNAR) if key in body]
    if len(present) != 1:
        problem = "has both" if present else "is missing"
        raise BadRequestError(f"the request {problem} 'instances' (rows) and 'inputs' (columns): send one, e.g. "
                              '{"instances": [{"b64": "..."}, ...]}')
    return present[0]


def _batch(layout: str, value, key: str) -> list:
    """The one input's value, one item per image: rows unwrapped from ``{key: value}``, or the column."""
    if layout == ROW:
        if not isinstance(value, list):
            raise BadRequestError("'instances' must be a list, one item per image")
        return [_unwrapped(value=item, key=key, where=f"instance {i}") for i, item in enumerate(value)]
    value = _unwrapped(value=value, key=key, where="'inputs'")
    if not isinstance(value, list):
        raise BadRequestError(f"input '{key}' must be a list, one item per image")
    return value


def _unwrapped(value, key: str, where: str):
    """``value`` itself, or what it holds under ``key`` when it names inputs (a ``{"b64": ...}`` is a value)."""
    if not isinstance(value, dict) or "b64" in value:
        return value
    if set(value) != {key}:
        raise BadRequestError(f"{where} names the inputs {echo_list(sorted(value))}; the signature has one "
                              f"input, '{key}'")
    return value[key]


def _run(engine: Engine, signature: Signature, items: list, name: str, version: int | None) -> Answer:
    engine.check_count(len(items))  # before decoding any base64 or building any array
    if signature.takes_pixels:
        shape = (len(items), *_nested_shape(items[0])) if items else (0,)
        return engine.classify_pixels(shape, lambda: _pixels(items, shape, signature.input.key), name, version)
    return engine.classify([_image_bytes(f"instance {i}", item) for i, item in enumerate(items)], name,
                           version=version)


def _nested_shape(value) -> tuple[int, ...]:
    """The shape nested lists claim along their first items (np.asarray checks the rest, later)."""
    dims = []
    while isinstance(value, list):
        dims.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(dims)


def _pixels(items: list, shape: tuple[int, ...], key: str) -> np.ndarray:
    """Called by the engine once ``shape`` passed its checks, inside the decode budget."""
    try:
        array = np.asarray(items)
    except ValueError:  # ragged lists
        array = None
    if array is None or array.shape != shape or array.dtype.kind not in "fiu":
        raise BadRequestError(f"input '{key}' must be numbers nested as [n, height, width, 3], each list as long as "
                              f"the first of its level {list(shape)}")
    return array.astype(np.float32)


def _image_bytes(where: str, item) -> bytes:
    if not isinstance(item, dict) or set(item) != {"b64"} or not isinstance(item["b64"], str):
        raise BadRequestError(f'{where}: expected {{"b64": "<base64 image>"}}')
    try:
        return base64.b64decode(item["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError(f"{where}: invalid base64") from None


def _classify_images(engine: Engine, body: dict) -> list[bytes]:
    """Encoded images of a ``:classify`` body: TF Serving's ``examples`` (and ``context``), or ``instances``."""
    if "examples" not in body:
        items = _batch(ROW, body.get(ROW), "image_bytes")
        engine.check_count(len(items))
        return [_image_bytes(f"instance {i}", item) for i, item in enumerate(items)]
    examples, context = body["examples"], body.get("context") or {}
    if not isinstance(examples, list) or not all(isinstance(e, dict) for e in [*examples, context]):
        raise BadRequestError("'examples' must be a list of objects (and 'context' an object)")
    engine.check_count(len(examples))
    return [_example_image(i, example, context) for i, example in enumerate(examples)]


def _example_image(i: int, example: dict, context: dict) -> bytes:
    for features in (example, context):
        for feature in IMAGE_FEATURES:
            if feature in features:
                return _image_bytes(f"example {i} feature '{feature}'", features[feature])
    raise BadRequestError(f"example {i} has no image: put it in a feature named '{IMAGE_FEATURES[0]}' "
                          f"(or '{IMAGE_FEATURES[1]}') as {{\"b64\": \"...\"}}")


def output_values(answer: Answer, signature: Signature) -> dict[str, list]:
    """Each output of ``signature`` as nested lists over the batch: ``scores`` [n, classes], ``classes`` the labels."""
    values = {SCORES: answer.scores.tolist(), CLASSES: [list(answer.labels) for _ in answer.scores]}
    return {output.key: values[output.key] for output in signature.outputs}


def as_rows(outputs: dict[str, list]) -> list:
    """``predictions``: one object of outputs per row, or bare values when there is one output (TF Serving)."""
    if len(outputs) == 1:
        return next(iter(outputs.values()))
    rows = len(next(iter(outputs.values())))
    return [{key: values[i] for key, values in outputs.items()} for i in range(rows)]


def as_columns(outputs: dict[str, list]) -> dict | list:
    """``outputs``: an object of whole outputs, or the bare output when there is one (TF Serving)."""
    return next(iter(outputs.values())) if len(outputs) == 1 else outputs
