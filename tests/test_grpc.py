"""TensorFlow Serving's gRPC API, driven with the official stubs exactly as a TF Serving client would.

The service runs in-process on 127.0.0.1 (waitress and the gRPC server over one engine, as
``python -m service`` runs them) and, for the command line, as real processes. The model is a
real retrained graph (a tiny base, so the file stays fast) with its exported SavedModel, which
is what TF Serving itself would load.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from imageclf import label_image_cli
from imageclf.engine.classify import Engine, Limits
from imageclf.graph_model import GraphModel
from imageclf.images import decode_image
from imageclf.preprocess import image_to_model_input
from service.grpc_api import GrpcServer

from .conftest import REPO, free_port
from .service_helpers import HttpAndGrpc, retrained_with_pictures

MODEL = "shapes"
SIZE = (32, 32)  # the tiny base's input
LABELS = ["circle", "square", "triangle"]
JSON = {"Content-Type": "application/json"}
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def model(tiny_module, tmp_path_factory):
    """A retrained graph in ``graphs/``, its SavedModel, and the pictures it was trained on (plus a PNG)."""
    out = tmp_path_factory.mktemp("grpc_model")
    return retrained_with_pictures(tiny_module, out, MODEL, saved_model_dir=str(out / "saved_model"))


class Service(HttpAndGrpc):
    """HTTP and gRPC over one engine, with TF Serving's gRPC stubs."""

    def __init__(self, graphs: Path, root: Path, **config):
        super().__init__(graphs, root, **config)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc.port}")
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        super().close()


@pytest.fixture(scope="module")
def served(model):
    result, images = model
    service = Service(result.graph.parent, images, max_instances=4, max_pixels=1_000_000,
                      max_upload_bytes=300_000, batch_size=2)
    yield service
    service.close()


def predict_request(signature: str = "", name: str = MODEL, version: int | None = None,
                    **inputs) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def classify_request(*examples: dict, signature: str = "") -> classification_pb2.ClassificationRequest:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = signature
    for features in examples:
        request.input.example_list.examples.add().CopyFrom(tf.train.Example(features=tf.train.Features(feature={
            key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[value])) for key, value in features.items()})))
    return request


def failure(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    error = info.value
    assert error.code() != Code.INTERNAL and "Traceback" not in (error.details() or "")
    return error


def pixels(path: Path) -> np.ndarray:
    """What a client that decodes and resizes itself sends to ``predict_images``: imageclf's preprocessing."""
    return image_to_model_input(decode_image(path.read_bytes(), name=path.name, size=SIZE), SIZE)


def graph_version(graph: Path) -> int:
    return json.loads(graph.with_suffix(".json").read_text())["version"]


def test_predict_answers_as_rest_and_label_image(served, model, capsys):
    result, images = model
    files = [images / "circle" / "circle_001.jpg", images / "triangle.png"]
    data = [f.read_bytes() for f in files]
    response = served.prediction.Predict(predict_request(image_bytes=data), timeout=30)

    assert response.model_spec.name == MODEL and response.model_spec.signature_name == "serving_default"
    assert response.model_spec.version.value == graph_version(result.graph)
    scores, classes = response.outputs["scores"], response.outputs["classes"]
    assert scores.dtype == tf.float32.as_datatype_enum and classes.dtype == tf.string.as_datatype_enum
    assert len(scores.float_val) == 6  # filled as TF Serving fills it: clients read float_val
    assert tf.make_ndarray(classes).tolist() == [[label.encode() for label in LABELS]] * 2
    got = tf.make_ndarray(scores)
    assert got.shape == (2, 3) and got.dtype == np.float32

    body = json.dumps({"instances": [{"b64": base64.b64encode(d).decode()} for d in data]}).encode()
    status, rest = served.http.json(f"/v1/models/{MODEL}:predict", data=body, headers=JSON)
    assert status == 200
    np.testing.assert_allclose(got, [row["scores"] for row in rest["predictions"]], rtol=0, atol=1e-5)
    for row, path in zip(got, files, strict=True):
        assert label_image_cli.main(["--graph", str(result.graph), "--image", str(path), "--json", "--top_k", "3"]) == 0
        cli = {p["label"]: p["score"] for p in json.loads(capsys.readouterr().out)["predictions"]}
        np.testing.assert_allclose(row, [cli[label] for label in LABELS], rtol=0, atol=1e-5)


def test_predict_images_takes_float_pixels_as_the_saved_model_does(served, model):
    result, images = model
    files = [images / "square" / "square_002.jpg", images / "triangle.png"]
    batch = np.stack([pixels(f) for f in files])
    assert batch.dtype == np.float32 and batch.shape == (2, *SIZE, 3)
    response = served.prediction.Predict(predict_request("predict_images", images=batch), timeout=30)
    assert response.model_spec.signature_name == "predict_images"
    got = tf.make_ndarray(response.outputs["scores"])
    encoded = served.prediction.Predict(predict_request(image_bytes=[f.read_bytes() for f in files]), timeout=30)
    np.testing.assert_allclose(got, tf.make_ndarray(encoded.outputs["scores"]), rtol=0, atol=1e-5)

    # What TF Serving answers from the exported SavedModel for the same request: same values, dtypes, shapes.
    exported = tf.saved_model.load(str(result.saved_model)).signatures["predict_images"](images=tf.constant(batch))
    np.testing.assert_allclose(got, exported["scores"].numpy(), rtol=0, atol=1e-5)
    for key, tensor in exported.items():
        ours = tf.make_ndarray(response.outputs[key])
        assert ours.shape == tuple(tensor.shape) and tf.as_dtype(response.outputs[key].dtype) == tensor.dtype
    assert tf.make_ndarray(response.outputs["classes"]).tolist() == exported["classes"].numpy().tolist()


def test_output_filter_answers_only_what_is_asked(served, model):
    _, images = model
    request = predict_request(image_bytes=[(images / "circle" / "circle_002.jpg").read_bytes()])
    request.output_filter.append("scores")
    assert list(served.prediction.Predict(request, timeout=30).outputs) == ["scores"]
    request.output_filter.append("logits")
    assert "logits" in failure(served.prediction.Predict, request).details()


def test_classify_reads_image_bytes_from_tf_examples(served, model):
    _, images = model
    a, b = (images / "circle" / "circle_003.jpg").read_bytes(), (images / "square" / "square_003.jpg").read_bytes()
    response = served.prediction.Classify(classify_request({"image/encoded": a}, {"image_bytes": b}), timeout=30)
    predicted = tf.make_ndarray(served.prediction.Predict(predict_request(image_bytes=[a, b]), timeout=30)
                                .outputs["scores"])
    assert response.model_spec.name == MODEL and len(response.result.classifications) == 2
    for classification, row in zip(response.result.classifications, predicted, strict=True):
        assert [c.label for c in classification.classes] == LABELS
        np.testing.assert_allclose([c.score for c in classification.classes], row, rtol=0, atol=1e-6)

    error = failure(served.prediction.Classify, classify_request({"image": a}))
    assert error.code() == Code.INVALID_ARGUMENT and "image/encoded" in error.details()
    error = failure(served.prediction.Classify, classify_request({"image/encoded": a}, signature="predict_images"))
    assert error.code() == Code.INVALID_ARGUMENT
    error = failure(served.prediction.Classify, classify_request(*[{"image/encoded": a}] * 5))
    assert error.code() == Code.INVALID_ARGUMENT and "limit is 4" in error.details()


def test_metadata_has_the_saved_models_signatures(served, model):
    result, _ = model
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL
    response = served.prediction.GetModelMetadata(request, timeout=30)
    assert response.model_spec.version.value == graph_version(result.graph)
    ours = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(ours)

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((result.saved_model / "saved_model.pb").read_bytes())
    exported = saved.meta_graphs[0].signature_def
    assert set(ours.signature_def) == set(exported) == {"serving_default", "predict_images"}
    for name, signature in exported.items():
        # Tensor names too: the SavedModel's ``classes`` is the Tile op its export adds.
        assert ours.signature_def[name] == signature, name

    request.ClearField("metadata_field")
    assert failure(served.prediction.GetModelMetadata, request).code() == Code.INVALID_ARGUMENT


def test_model_status(served, model):
    result, _ = model
    version = graph_version(result.graph)
    for asked in (None, version):
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = MODEL
        if asked is not None:
            request.model_spec.version.value = asked
        (status,) = served.models.GetModelStatus(request, timeout=30).model_version_status
        assert status.version == version and status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert status.status.error_code == 0
    request.model_spec.version.value = version + 1
    assert failure(served.models.GetModelStatus, request).code() == Code.NOT_FOUND
    request.model_spec.version_label = "stable"  # names the served version, as REST's /labels/stable
    (status,) = served.models.GetModelStatus(request, timeout=30).model_version_status
    assert status.version == version
    request.model_spec.version_label = "beta"
    error = failure(served.models.GetModelStatus, request)
    assert error.code() == Code.INVALID_ARGUMENT and "Unrecognized servable version label: beta" in error.details()
    request.model_spec.name = "nope"
    request.model_spec.ClearField("version_label")  # a oneof with version: neither is set now
    assert failure(served.models.GetModelStatus, request).code() == Code.NOT_FOUND


def test_older_graphs_take_pixels_in_0_1_and_failed_loads_show_in_status(poets_like_graph, tmp_path):
    """A batch-1 graph fed (p - 127.5) / 127.5 still takes ``images`` in [0, 1]; a broken graph is END."""
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    shutil.copy(poets_like_graph.graph, graphs / "defects.pb")
    shutil.copy(poets_like_graph.labels_file, graphs / "defects.labels.txt")
    (graphs / "defects.json").write_text(json.dumps(poets_like_graph.settings_json("defects.labels.txt")))
    (graphs / "broken.pb").write_bytes(b"not a graph")
    image = poets_like_graph.sample_images[2]
    size = poets_like_graph.input_size
    x = image_to_model_input(decode_image(image.read_bytes(), name=image.name, size=size), size)
    model = GraphModel(graphs / "defects.pb")
    try:
        expected = model.session.run(model.output, {model.input: ((x * 255 - 127.5) / 127.5)[None]})[0]
    finally:
        model.close()
    service = Service(graphs, image.parent)
    try:
        response = service.prediction.Predict(predict_request("predict_images", name="defects", images=x[None]),
                                              timeout=30)
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["scores"])[0], expected, rtol=0, atol=1e-5)
        encoded = service.prediction.Predict(predict_request(name="defects", image_bytes=[image.read_bytes()]),
                                             timeout=30)
        body = json.dumps({"instances": [{"b64": base64.b64encode(image.read_bytes()).decode()}]}).encode()
        rest = [row["scores"] for row in
                service.http.json("/v1/models/defects:predict", data=body, headers=JSON)[1]["predictions"]]
        np.testing.assert_allclose(tf.make_ndarray(encoded.outputs["scores"]), rest, rtol=0, atol=1e-5)

        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "broken"
        (status,) = service.models.GetModelStatus(request, timeout=30).model_version_status
        assert status.state == get_model_status_pb2.ModelVersionStatus.END
        assert status.status.error_code != 0 and "not a frozen TensorFlow GraphDef" in status.status.error_message
        error = failure(service.prediction.Predict, predict_request(name="broken", image_bytes=[b"x"]))
        assert error.code() == Code.NOT_FOUND
    finally:
        service.close()


def _jpeg(images: Path) -> bytes:
    return (images / "circle" / "circle_004.jpg").read_bytes()


ERRORS = {  # name: (request from the pictures folder, status code, words the message must have)
    "corrupt bytes": (lambda im: predict_request(image_bytes=[_jpeg(im)[:200]]), Code.INVALID_ARGUMENT, "instance 0"),
    "not an image": (lambda im: predict_request(image_bytes=[b"hello"]), Code.INVALID_ARGUMENT, "not an image"),
    "unknown model": (lambda im: predict_request(name="nope", image_bytes=[_jpeg(im)]), Code.NOT_FOUND,
                      "unknown model 'nope'"),
    "wrong version": (lambda im: predict_request(version=1, image_bytes=[_jpeg(im)]), Code.NOT_FOUND,
                      "no version 1"),
    "unknown signature": (lambda im: predict_request("predict", image_bytes=[_jpeg(im)]), Code.INVALID_ARGUMENT,
                          "unknown signature 'predict'"),
    "too many instances": (lambda im: predict_request(image_bytes=[_jpeg(im)] * 5), Code.INVALID_ARGUMENT,
                           "limit is 4"),
    "too many pixel instances": (lambda im: predict_request("predict_images", images=np.zeros((5, 32, 32, 3),
                                                                                             np.float32)),
                                 Code.INVALID_ARGUMENT, "limit is 4"),
    "float64 pixels": (lambda im: predict_request("predict_images", images=np.zeros((1, 32, 32, 3))),
                       Code.INVALID_ARGUMENT, "DT_FLOAT, not DT_DOUBLE"),
    "numbers as image bytes": (lambda im: predict_request(image_bytes=[1, 2]), Code.INVALID_ARGUMENT,
                               "DT_STRING, not DT_INT32"),
    "wrong pixel shape": (lambda im: predict_request("predict_images", images=np.zeros((1, 16, 16, 3), np.float32)),
                          Code.INVALID_ARGUMENT, "[n, 32, 32, 3]"),
    "pixels in 0..255": (lambda im: predict_request("predict_images", images=np.full((1, 32, 32, 3), 200,
                                                                                    np.float32)),
                         Code.INVALID_ARGUMENT, "[0, 1]"),
    "over max_pixels": (lambda im: predict_request(image_bytes=[(im / "huge.png").read_bytes()]),
                        Code.INVALID_ARGUMENT, "over the limit of 1,000,000 pixels"),
    "input of the other signature": (lambda im: predict_request(images=np.zeros((1, 32, 32, 3), np.float32)),
                                     Code.INVALID_ARGUMENT, "takes one input, 'image_bytes'"),
    "no model name": (lambda im: predict_request(name="", image_bytes=[_jpeg(im)]), Code.INVALID_ARGUMENT,
                      "model_spec.name"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_predict_requests_get_precise_status_codes(served, model, case):
    make, code, words = ERRORS[case]
    error = failure(served.prediction.Predict, make(model[1]))
    assert error.code() == code and words in error.details(), error.details()


LONG = "m" * 100_000  # a client value far over what an error text may quote back
MANY = [f"{i:04d}" + "k" * 1000 for i in range(50)]  # 50 KB of names


def _many_inputs(images: Path) -> predict_pb2.PredictRequest:
    request = predict_request(image_bytes=[_jpeg(images)])
    for key in MANY:
        request.inputs[key].CopyFrom(tf.make_tensor_proto([b"x"]))
    return request


def _filtered(images: Path) -> predict_pb2.PredictRequest:
    request = predict_request(image_bytes=[_jpeg(images)])
    request.output_filter.extend(MANY)
    return request


def _status_request(name: str) -> get_model_status_pb2.GetModelStatusRequest:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    return request


def _metadata_request(fields: list[str]) -> get_model_metadata_pb2.GetModelMetadataRequest:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=fields)
    request.model_spec.name = MODEL
    return request


LONG_VALUES = {  # name: (method, request from the pictures folder, status code)
    "model name": ("Predict", lambda im: predict_request(name=LONG, image_bytes=[_jpeg(im)]), Code.NOT_FOUND),
    "signature name": ("Predict", lambda im: predict_request(LONG, image_bytes=[_jpeg(im)]), Code.INVALID_ARGUMENT),
    "input keys": ("Predict", _many_inputs, Code.INVALID_ARGUMENT),
    "output filter": ("Predict", _filtered, Code.INVALID_ARGUMENT),
    "status of a model": ("GetModelStatus", lambda im: _status_request(LONG), Code.NOT_FOUND),
    "metadata fields": ("GetModelMetadata", lambda im: _metadata_request(MANY), Code.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", LONG_VALUES)
def test_error_texts_quote_client_values_cut_short(served, model, case):
    """A 100 KB name or 50 KB of keys comes back cut short: whole, it would pass the client's metadata limit."""
    method, make, code = LONG_VALUES[case]
    stub = served.models if method == "GetModelStatus" else served.prediction
    error = failure(getattr(stub, method), make(model[1]))
    details = error.details() or ""
    assert error.code() == code and len(details) < 1000, (error.code(), details[:300], len(details))
    assert "characters)" in details or "more" in details, details


def test_mutated_request_bytes_never_get_internal(served, model):
    """Bytes that are no PredictRequest, or a valid one with random bytes changed: a precise status, never INTERNAL."""
    call = served.channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
    error = failure(call, b"\xff\xff\xff")
    assert error.code() == Code.INVALID_ARGUMENT and "not a valid tensorflow.serving.PredictRequest" in error.details()
    valid = predict_request(image_bytes=[_jpeg(model[1])]).SerializeToString()
    rng = np.random.default_rng(10)
    codes = set()
    for _ in range(40):
        mutated = bytearray(valid)
        for at in rng.integers(0, 64, 3):  # the message head: spec, input map, tensor dtype and shape
            mutated[at] = rng.integers(0, 256)
        try:
            call(bytes(mutated), timeout=30)
            codes.add(Code.OK)
        except grpc.RpcError as e:
            codes.add(e.code())
            assert "Traceback" not in (e.details() or "")
    assert not codes & {Code.INTERNAL, Code.UNKNOWN}, codes
    assert Code.INVALID_ARGUMENT in codes


def test_oversize_message_is_refused_before_the_handler(served, model):
    request = predict_request(image_bytes=[bytes(400_000)])  # over max_upload_bytes + 64 KiB
    assert failure(served.prediction.Predict, request).code() == Code.RESOURCE_EXHAUSTED
    assert served.prediction.Predict(predict_request(image_bytes=[_jpeg(model[1])]), timeout=30).outputs


def test_unimplemented_methods_say_so(served):
    for call, request in [(served.prediction.Regress, regression_pb2.RegressionRequest()),
                          (served.prediction.MultiInference, inference_pb2.MultiInferenceRequest()),
                          (served.models.HandleReloadConfigRequest, model_management_pb2.ReloadConfigRequest())]:
        error = failure(call, request)
        assert error.code() == Code.UNIMPLEMENTED and "not supported" in error.details()


def _metric(text: str, name: str, **labels) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{re.escape(name)}{{{re.escape(selector)}}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_calls_are_counted_in_the_service_metrics(served, model):
    method = "/tensorflow.serving.PredictionService/Predict"

    def counts():
        text = served.http.request("/metrics")[2].decode()
        return (_metric(text, "imageclf_requests_total", endpoint=method, status="OK"),
                _metric(text, "imageclf_requests_total", endpoint=method, status="NOT_FOUND"),
                _metric(text, "imageclf_errors_total", kind="unknown_model"),
                _metric(text, "imageclf_request_seconds_count", endpoint=method))
    before = counts()
    served.prediction.Predict(predict_request(image_bytes=[_jpeg(model[1])]), timeout=30)
    failure(served.prediction.Predict, predict_request(name="nope", image_bytes=[_jpeg(model[1])]))
    assert np.subtract(counts(), before).tolist() == [1, 1, 1, 2]
    status, _, _ = served.http.request("/?file=circle/circle_000.jpg")  # HTTP keeps its own series
    assert status == 200 and _metric(served.http.request("/metrics")[2].decode(), "imageclf_requests_total",
                                     endpoint="/", status="200") >= 1


def test_both_signatures_go_through_the_batcher(served, model):
    _, images = model
    files = [images / "circle" / f"circle_00{i}.jpg" for i in range(3)]
    with served.engine.hold(MODEL) as servable:
        stats = servable.batcher.stats
        before = dict(stats)
        served.prediction.Predict(predict_request(image_bytes=[f.read_bytes() for f in files]), timeout=30)
        served.prediction.Predict(predict_request("predict_images", images=np.stack([pixels(f) for f in files])),
                                  timeout=30)
        assert stats["items"] - before["items"] == 6
        assert stats["batches"] - before["batches"] >= 4 and stats["largest"] <= 2  # --batch_size 2


def test_pixels_count_against_the_decode_budget_calls_are_bounded_and_stop_leaves_no_threads(served):
    """A second gRPC server over the same models: a 50 kB decode budget (4 images need 98 kB), one call at a time."""
    before = set(threading.enumerate())
    engine = Engine(served.engine.registry, Limits(max_instances=4, memory_budget_bytes=50_000, budget_wait_s=3))
    server = GrpcServer(engine, served.metrics, host="127.0.0.1", port=0, threads=2, max_message_bytes=1 << 20,
                        max_concurrent_rpcs=1)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus
        status_request = get_model_status_pb2.GetModelStatusRequest()
        status_request.model_spec.name = MODEL
        one = np.full((1, 32, 32, 3), 0.5, np.float32)
        assert stub.Predict(predict_request("predict_images", images=one), timeout=30).outputs
        error = failure(stub.Predict, predict_request("predict_images", images=np.repeat(one, 4, axis=0)))
        assert error.code() == Code.INVALID_ARGUMENT and "decode budget" in error.details()
        with engine.budget.reserve(40_000):  # other requests hold most of the budget
            def send():
                return stub.Predict.future(predict_request("predict_images", images=one), timeout=30)
            waiting, refused, deadline = send(), None, time.monotonic() + 60
            while refused is None and time.monotonic() < deadline:  # a second call while one waits is refused
                if waiting.done():
                    waiting = send()  # it came while a status call held the one slot
                try:
                    status(status_request, timeout=30)
                except grpc.RpcError as e:
                    refused = e
            assert refused is not None and refused.code() == Code.RESOURCE_EXHAUSTED
            assert waiting.exception().code() == Code.UNAVAILABLE  # busy for the whole wait: retry later
            assert "memory budget" in waiting.exception().details()
    finally:
        channel.close()
        server.stop(grace=1)
    deadline = time.monotonic() + 10
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(threading.enumerate()) - before


def _start(args: list[str], env: dict) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), *args], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, port


def _wait_ready(process: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the service did not get ready: {process.communicate(timeout=10)[0][-2000:]}")


def _interrupt(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGINT)  # Ctrl-C
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 0 and "Traceback" not in output, output[-2000:]
    return output


def test_command_line_serves_grpc_and_grpc_port_0_turns_it_off(model, tmp_path):
    result, images = model
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    shutil.copy(result.graph, graphs / f"{MODEL}.pb")
    common = ["--graphs_dir", str(graphs), "--image_root", str(images)]
    grpc_on, grpc_off = free_port(), free_port()
    on, on_port = _start(common, {**os.environ, "IMAGECLF_GRPC_PORT": str(grpc_on)})
    # The flag wins over the environment: nothing may listen on grpc_off.
    off, off_port = _start([*common, "--grpc_port", "0"], {**os.environ, "IMAGECLF_GRPC_PORT": str(grpc_off)})
    try:
        _wait_ready(on, on_port)
        _wait_ready(off, off_port)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_on}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            response = stub.Predict(predict_request(image_bytes=[_jpeg(images)]), timeout=30)
            assert tf.make_ndarray(response.outputs["scores"]).shape == (1, 3)
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", grpc_off)) != 0
    finally:
        on_output, off_output = _interrupt(on), _interrupt(off)
    assert f"and gRPC on 127.0.0.1:{grpc_on}" in on_output
    assert "gRPC" not in off_output


def test_a_grpc_port_in_use_is_one_line_and_exit_status_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "service", "--graphs_dir", str(tmp_path), "--port", "0",
                                 "--grpc_port", str(port)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--grpc_port {port}: cannot listen" in result.stderr and "0 to turn gRPC off" in result.stderr
