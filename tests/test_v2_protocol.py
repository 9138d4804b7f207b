"""The Open Inference Protocol v2 (KServe v2, Triton's API), driven with tritonclient, the real client.

The service runs in-process on 127.0.0.1 (waitress and the gRPC server over one engine, as
``python -m service`` wires them) with a real retrained graph. Every answer is checked against
what the service's own TF Serving REST route (/v1 :predict) answers for the same image.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from imageclf.engine.classify import (
    BadInputError,
    ModelNotFoundError,
    TooManyInstancesError,
    TooManyPixelsError,
    VersionNotFoundError,
)
from imageclf.images import decode_image
from imageclf.preprocess import image_to_model_input
from service import v2_protocol

from .conftest import wait_until
from .service_helpers import HttpAndGrpc, Server, retrained_with_pictures

MODEL = "shapes"
SIZE = (32, 32)  # the tiny base's input
LABELS = ["circle", "square", "triangle"]
JSON = {"Content-Type": "application/json"}
MAX_UPLOAD = 300_000


@pytest.fixture(scope="module")
def model(tiny_module, tmp_path_factory):
    """A retrained graph in ``graphs/`` and pictures: a JPEG and a PNG of the classes, a huge PNG."""
    return retrained_with_pictures(tiny_module, tmp_path_factory.mktemp("v2_model"), MODEL)


class Service(HttpAndGrpc):
    """HTTP and gRPC over one engine, as ``python -m service`` runs them, and tritonclient for each."""

    def __init__(self, graphs: Path, root: Path, **config):
        super().__init__(graphs, root, **config)
        self.client = httpclient.InferenceServerClient(f"127.0.0.1:{self.http.port}", network_timeout=60)
        self.grpc_client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc.port}")

    def close(self) -> None:
        self.client.close()
        self.grpc_client.close()
        super().close()


@pytest.fixture(scope="module")
def served(model):
    result, images = model
    service = Service(result.graph.parent, images, max_instances=4, max_pixels=1_000_000,
                      max_upload_bytes=MAX_UPLOAD, batch_size=2)
    yield service
    service.close()


def files(images: Path) -> list[Path]:
    return [images / "circle" / "circle_001.jpg", images / "triangle.png"]


def v1_scores(served: Service, data: list[bytes]) -> np.ndarray:
    """The service's own TF Serving REST answer for the same images."""
    body = json.dumps({"instances": [{"b64": base64.b64encode(d).decode()} for d in data]}).encode()
    status, answer = served.http.json(f"/v1/models/{MODEL}:predict", data=body, headers=JSON)
    assert status == 200, answer
    return np.array([row["scores"] for row in answer["predictions"]], np.float32)


def bytes_input(client, data: list[bytes], binary: bool = True, shape: tuple | None = None):
    array = np.array(data, dtype=np.object_).reshape(shape or (len(data),))
    tensor = client.InferInput("image_bytes", list(array.shape), "BYTES")
    if client is httpclient:
        tensor.set_data_from_numpy(array, binary_data=binary)
    else:
        tensor.set_data_from_numpy(array)
    return tensor


def pixels(path: Path) -> np.ndarray:
    """What a client that decodes and resizes itself sends: imageclf's preprocessing, RGB in [0, 1]."""
    return image_to_model_input(decode_image(path.read_bytes(), name=path.name, size=SIZE), SIZE)


def refused(call, *args, **kw) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kw)
    assert "Traceback" not in str(info.value) and info.value.status() not in ("500", "StatusCode.INTERNAL")
    return info.value


@pytest.mark.parametrize("client_kind", ["http", "grpc"])
def test_health_and_metadata(served, client_kind):
    client = served.client if client_kind == "http" else served.grpc_client
    version = str(served.http.engine.registry.statuses()[0].served.version)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, version)
    assert not client.is_model_ready("nope") and not client.is_model_ready(MODEL, "1")

    if client_kind == "http":
        server, meta = client.get_server_metadata(), client.get_model_metadata(MODEL, version)
    else:
        server = client.get_server_metadata(as_json=True)
        meta = client.get_model_metadata(MODEL, version, as_json=True)
        for tensor in meta["inputs"] + meta["outputs"]:  # protobuf's JSON writes int64 as strings
            tensor["shape"] = [int(d) for d in tensor["shape"]]
    assert server["name"] == "imageclf" and set(server["extensions"]) == {"classification", "binary_tensor_data"}
    assert meta["name"] == MODEL and meta["versions"] == [version] and meta["platform"] == "tensorflow_graphdef"
    assert meta["inputs"] == [{"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
                              {"name": "images", "datatype": "FP32", "shape": [-1, *SIZE, 3]}]
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "classes", "datatype": "BYTES", "shape": [-1, 3]}]


def test_http_health_answers_are_the_protocols(served):
    assert served.http.request("/v2/health/live")[::2] == (200, b"")
    assert served.http.request(f"/v2/models/{MODEL}/ready")[::2] == (200, b"")
    status, answer = served.http.json("/v2/models/nope/ready")
    assert status == 404 and "unknown model 'nope'" in answer["error"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_infer_encoded_images_answers_as_v1(served, model, binary):
    data = [f.read_bytes() for f in files(model[1])]
    outputs = [httpclient.InferRequestedOutput("scores", binary_data=binary),
               httpclient.InferRequestedOutput("classes", binary_data=binary)]
    if binary:
        inputs, parameters = [bytes_input(httpclient, data)], None
    else:  # JSON carries BYTES as text: the images as base64, marked so
        inputs = [bytes_input(httpclient, [base64.b64encode(d) for d in data], binary=False, shape=(2, 1))]
        parameters = {"content_type": "base64"}
    result = served.client.infer(MODEL, inputs, outputs=outputs, request_id="req-7", parameters=parameters)

    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == MODEL
    assert all(("data" in o) != binary for o in response["outputs"])
    scores = result.as_numpy("scores")
    assert scores.dtype == np.float32 and scores.shape == (2, 3)
    np.testing.assert_allclose(scores, v1_scores(served, data), rtol=0, atol=1e-5)
    classes = [[c.decode() if binary else c for c in row] for row in result.as_numpy("classes").tolist()]
    assert classes == [LABELS] * 2  # tritonclient reads JSON BYTES as str, binary ones as bytes


def test_http_binary_everything_without_outputs_named(served, model):
    """tritonclient's default: no outputs named, so binary_data_output; every output comes back binary."""
    data = [files(model[1])[0].read_bytes()]
    result = served.client.infer(MODEL, [bytes_input(httpclient, data)])
    assert {o["name"]: "parameters" in o for o in result.get_response()["outputs"]} == {"scores": True,
                                                                                         "classes": True}
    np.testing.assert_allclose(result.as_numpy("scores"), v1_scores(served, data), rtol=0, atol=1e-5)


@pytest.mark.parametrize("client_kind", ["http", "grpc"])
def test_pixels_answer_as_the_encoded_image(served, model, client_kind):
    paths = files(model[1])
    client = httpclient if client_kind == "http" else grpcclient
    batch = np.stack([pixels(p) for p in paths])
    tensor = client.InferInput("images", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    result = (served.client if client_kind == "http" else served.grpc_client).infer(MODEL, [tensor])
    np.testing.assert_allclose(result.as_numpy("scores"), v1_scores(served, [p.read_bytes() for p in paths]),
                               rtol=0, atol=1e-5)


def test_http_json_pixels_flat_or_nested(served, model):
    path = files(model[1])[1]
    x = pixels(path)[None]
    expected = v1_scores(served, [path.read_bytes()])
    for data in (x.ravel().tolist(), x.tolist()):
        body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": data}],
                "outputs": [{"name": "scores"}]}
        status, answer = served.http.json(f"/v2/models/{MODEL}/infer", data=json.dumps(body).encode(), headers=JSON)
        assert status == 200, answer
        assert [o["name"] for o in answer["outputs"]] == ["scores"] and answer["outputs"][0]["shape"] == [1, 3]
        np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], (1, 3)), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("client_kind", ["http", "grpc"])
def test_classification_extension_and_requested_outputs(served, model, client_kind):
    client = httpclient if client_kind == "http" else grpcclient
    data = [f.read_bytes() for f in files(model[1])]
    result = (served.client if client_kind == "http" else served.grpc_client).infer(
        MODEL, [bytes_input(client, data)], outputs=[client.InferRequestedOutput("scores", class_count=2)],
        model_version="")
    assert result.as_numpy("classes") is None  # only what was asked for
    top = result.as_numpy("scores")
    assert top.shape == (2, 2)
    expected = v1_scores(served, data)
    for row, scores in zip(top, expected, strict=True):
        order = np.argsort(-scores, kind="stable")[:2]
        parsed = [entry.decode().split(":") for entry in row]
        assert [(int(i), label) for _, i, label in parsed] == [(i, LABELS[i]) for i in order]
        np.testing.assert_allclose([float(s) for s, _, _ in parsed], scores[order], rtol=0, atol=1e-5)


@pytest.mark.parametrize("client_kind", ["http", "grpc"])
def test_errors_in_the_protocols_shape(served, model, client_kind):
    """Each error is answered as its class declares (imageclf.errors), on /v2 as on /v1."""
    client = httpclient if client_kind == "http" else grpcclient
    stub = served.client if client_kind == "http" else served.grpc_client

    def status(error_class) -> str:
        return str(error_class.http_status) if client_kind == "http" else f"StatusCode.{error_class.grpc_code}"

    jpeg = files(model[1])[0].read_bytes()
    bad = jpeg[:len(jpeg) // 3]
    error = refused(stub.infer, MODEL, [bytes_input(client, [bad])])
    assert error.status() == status(BadInputError) in ("400", "StatusCode.INVALID_ARGUMENT")
    code, v1 = served.http.json(f"/v1/models/{MODEL}:predict", headers=JSON, data=json.dumps(
        {"instances": [{"b64": base64.b64encode(bad).decode()}]}).encode())
    assert code == 400 and error.message() == v1["error"]  # the engine's message, word for word

    error = refused(stub.infer, "nope", [bytes_input(client, [jpeg])])
    assert error.status() == status(ModelNotFoundError) and "unknown model 'nope'" in error.message()
    assert refused(stub.get_model_metadata, "nope").status() == status(ModelNotFoundError)
    error = refused(stub.infer, MODEL, [bytes_input(client, [jpeg])], model_version="1")
    assert error.status() == status(VersionNotFoundError) and "has no version 1" in error.message()
    assert error.status() in ("404", "StatusCode.NOT_FOUND")

    for inputs, words, error_class in [
            ([bytes_input(client, [jpeg] * 5)], "5 images in one request; the limit is 4", TooManyInstancesError),
            ([bytes_input(client, [(model[1] / "huge.png").read_bytes()])], "pixels", TooManyPixelsError),
            ([bytes_input(client, [jpeg])] * 2, "exactly one input", v2_protocol.ProtocolError)]:
        error = refused(stub.infer, MODEL, inputs)
        assert error.status() == status(error_class) and words in error.message()
    code, v1 = served.http.json(f"/v1/models/{MODEL}:predict", headers=JSON, data=json.dumps(
        {"instances": [{"b64": base64.b64encode(jpeg).decode()}] * 5}).encode())
    assert code == TooManyInstancesError.http_status == 413
    error = refused(stub.infer, MODEL, [bytes_input(client, [jpeg])], outputs=[client.InferRequestedOutput("logits")])
    assert error.status() == status(v2_protocol.ProtocolError) and "unknown output 'logits'" in error.message()


def test_http_json_bytes_need_base64_and_binary_sizes_must_add_up(served, model):
    url = f"/v2/models/{MODEL}/infer"
    body = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]}
    status, answer = served.http.json(url, data=json.dumps(body).encode(), headers=JSON)
    assert status == 400 and '"content_type": "base64"' in answer["error"]
    body["inputs"][0]["parameters"] = {"content_type": "base64"}
    status, answer = served.http.json(url, data=json.dumps(body).encode(), headers=JSON)
    assert status == 400 and "invalid base64" in answer["error"]

    jpeg = files(model[1])[0].read_bytes()
    raw = len(jpeg).to_bytes(4, "little") + jpeg
    header = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(raw) + 1}}]}).encode()
    status, answer = served.http.json(url, data=header + raw, headers={"Inference-Header-Content-Length":
                                                                         str(len(header))})
    assert status == 400 and "only" in answer["error"]
    for length in ("-1", "abc", str(len(header) + len(raw) + 1)):
        status, answer = served.http.json(url, data=header + raw, headers={"Inference-Header-Content-Length": length})
        assert status == 400 and "Inference-Header-Content-Length" in answer["error"]


def test_over_limit_bodies_are_refused_as_uploads_are(served, model):
    body = bytes(MAX_UPLOAD + 1000)  # over the upload limit, under the server's own body limit
    upload = served.http.json("/classify", data=body, headers={"Content-Type": "application/octet-stream"})
    assert upload[0] == 413
    data = [bytes(MAX_UPLOAD)]
    error = refused(served.client.infer, MODEL, [bytes_input(httpclient, data)])
    assert error.status() == "413" and error.message() == upload[1]["error"]
    error = refused(served.grpc_client.infer, MODEL, [bytes_input(grpcclient, [bytes(MAX_UPLOAD + 70_000)])])
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"


def test_infer_is_model_work_counted_in_metrics(served, model):
    data = [files(model[1])[0].read_bytes()]
    served.client.infer(MODEL, [bytes_input(httpclient, data)])
    served.grpc_client.infer(MODEL, [bytes_input(grpcclient, data)])
    text = served.http.request("/metrics")[2].decode()
    assert re.search(r'imageclf_requests_total\{endpoint="/v2/models/<name>/infer",status="200"\} [1-9]', text)
    assert re.search(r'imageclf_requests_total\{endpoint="/inference.GRPCInferenceService/ModelInfer",'
                     r'status="OK"\} [1-9]', text)


def _inputs(**item) -> dict:
    return {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, *SIZE, 3], **item}]}


ZEROS = [0.0] * (SIZE[0] * SIZE[1] * 3)
BAD_BODIES = {
    "not JSON": b"{inputs",
    "not an object": b"[]",
    "no inputs": b"{}",
    "input not an object": json.dumps({"inputs": ["x"]}).encode(),
    "no inputs given": json.dumps({"inputs": []}).encode(),
    "unknown input": json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}).encode(),
    "wrong datatype": json.dumps(_inputs(datatype="FP64", data=ZEROS)).encode(),
    "negative shape": json.dumps(_inputs(shape=[-1, *SIZE, 3], data=ZEROS)).encode(),
    "shape of strings": json.dumps(_inputs(shape=["1"], data=ZEROS)).encode(),
    "no data": json.dumps(_inputs()).encode(),
    "data of strings": json.dumps(_inputs(data=["a"] * len(ZEROS))).encode(),
    "ragged data": json.dumps(_inputs(data=[[0.0], [0.0, 1.0]])).encode(),
    "data an object": json.dumps(_inputs(data={"a": 1})).encode(),
    "too few values": json.dumps(_inputs(data=ZEROS[:-1])).encode(),
    "wrong size": json.dumps(_inputs(shape=[1, 16, 16, 3], data=ZEROS[:768])).encode(),
    "no batch dimension": json.dumps(_inputs(shape=[*SIZE, 3], data=ZEROS)).encode(),
    "values over 1": json.dumps(_inputs(data=[200.0] * len(ZEROS))).encode(),
    "zero images": json.dumps(_inputs(shape=[0, *SIZE, 3], data=[])).encode(),
    "huge shape": json.dumps(_inputs(shape=[1, 10**9, 10**9, 3], data=[0.0])).encode(),
    "bytes as numbers": json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                                "data": [1], "parameters": {"content_type": "base64"}}]}).encode(),
    "bytes shape [1, 2]": json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1, 2],
                                                  "data": ["a", "b"]}]}).encode(),
    "content_type pd": json.dumps({**_inputs(data=ZEROS), "parameters": {"content_type": "pd"}}).encode(),
    "parameters a list": json.dumps({**_inputs(data=ZEROS), "parameters": []}).encode(),
    "id a number": json.dumps({**_inputs(data=ZEROS), "id": 7}).encode(),
    "outputs an object": json.dumps({**_inputs(data=ZEROS), "outputs": {}}).encode(),
    "classification of labels": json.dumps({**_inputs(data=ZEROS), "outputs": [
        {"name": "classes", "parameters": {"classification": 2}}]}).encode(),
    "classification as text": json.dumps({**_inputs(data=ZEROS), "outputs": [
        {"name": "scores", "parameters": {"classification": "2"}}]}).encode(),
    "binary_data as text": json.dumps({**_inputs(data=ZEROS), "outputs": [
        {"name": "scores", "parameters": {"binary_data": "yes"}}]}).encode(),
    "shared memory": json.dumps(_inputs(parameters={"shared_memory_region": "r"})).encode(),
    "data and binary": json.dumps(_inputs(data=ZEROS, parameters={"binary_data_size": 4})).encode(),
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_bad_requests_are_400_with_a_message(served, case):
    status, answer = served.http.json(f"/v2/models/{MODEL}/infer", data=BAD_BODIES[case], headers=JSON)
    assert status == 400 and answer["error"] and "Traceback" not in answer["error"], (status, answer)


def test_http_json_needs_a_json_media_type_unless_binary(served, model):
    body = json.dumps(_inputs(data=ZEROS)).encode()
    status, answer = served.http.json(f"/v2/models/{MODEL}/infer", data=body, headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in answer["error"]
    status, answer = served.http.json(f"/v2/models/{MODEL}/infer", data=body, headers={"Content-Type": "text/plain",
                                      "Inference-Header-Content-Length": str(len(body))})
    assert status == 200, answer


def test_grpc_raw_contents_must_match_the_inputs(served, model):
    channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc.port}")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1])
    request.raw_input_contents.extend([b"", b""])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in info.value.details()
    # typed contents instead of raw: as some clients send them
    jpeg = files(model[1])[0].read_bytes()
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1]).contents.bytes_contents.append(jpeg)
    response = stub.ModelInfer(request, timeout=30)
    scores = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(1, 3)
    np.testing.assert_allclose(scores, v1_scores(served, [jpeg]), rtol=0, atol=1e-5)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelStreamInfer(iter([request]), timeout=30).next()
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    channel.close()


def test_json_parsing_counts_against_the_decode_budget(model, tmp_path):
    """JSON takes up to ~30 bytes a byte once parsed: a body the budget cannot parse is refused, not parsed."""
    result, images = model
    noisy = tmp_path / "noisy.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (500, 500, 3), np.uint8)).save(noisy)
    data = noisy.read_bytes()
    # Decoding it takes ~22 MB of the budget (16 MiB of that a fixed allowance); parsing its base64 JSON, more.
    budget = 24
    assert v2_protocol.JSON_BYTES_FACTOR * len(base64.b64encode(data)) > budget << 20
    server = Server(result.graph.parent, images, memory_budget_mb=budget)
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        assert client.infer(MODEL, [bytes_input(httpclient, [data])]).as_numpy("scores").shape == (1, 3)
        error = refused(client.infer, MODEL, [bytes_input(httpclient, [base64.b64encode(data)], binary=False)],
                        parameters={"content_type": "base64"})
        assert error.status() == "400" and "too large to parse" in error.message()
        client.close()
    finally:
        server.close()


def test_infer_is_admitted_like_other_model_work_and_a_full_budget_is_503(model, tmp_path):
    """Beyond the queue bound an infer is refused at once (503), as uploads are; a full budget is 503 too."""
    result, images = model
    jpeg = files(images)[0].read_bytes()
    server = Server(result.graph.parent, images, threads=1, http={"max_queued_requests": 0,
                                                                   "max_connections_per_client": 0})
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    budget = server.engine.budget
    body = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                   "data": [base64.b64encode(jpeg).decode()],
                                   "parameters": {"content_type": "base64"}}]}).encode()
    answers = []
    try:
        budget.wait_seconds = 120  # the first request waits for the test, however slow the machine
        with budget.reserve(budget.capacity):
            first = threading.Thread(target=lambda: answers.append(
                server.json(f"/v2/models/{MODEL}/infer", data=body, headers=JSON)))
            first.start()
            wait_until(lambda: budget._waiting > 0, "the first infer waits for the budget in the one thread")
            error = refused(client.infer, MODEL, [bytes_input(httpclient, [jpeg])])
            assert error.status() == "503" and "retry after" in error.message()
        first.join(60)
        assert answers and answers[0][0] == 200, answers

        budget.wait_seconds = 0.05
        with budget.reserve(budget.capacity):
            status, headers, raw = server.response(f"/v2/models/{MODEL}/infer", data=body, headers=JSON)
        assert status == 503 and headers["Retry-After"] == "1" and "memory budget" in json.loads(raw)["error"]
    finally:
        client.close()
        server.close()
