"""``python -m service --backend grpc://HOST:PORT``: a front that forwards inference, tested front to back.

Two real ``python -m service`` processes on 127.0.0.1: the back serves a retrained graph (tiny base)
and speaks TF Serving's gRPC API; the front runs with ``--backend grpc://127.0.0.1:PORT``, loads no
graph and answers HTTP (and gRPC) by decoding with the one preprocessing and calling the back's
``predict_images`` with the official stubs. An in-process local service over the same graph gives
the answers the front must equal. The back is killed and restarted, and both processes are
stopped with SIGTERM while a request is in progress.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from imageclf.engine.backend_config import BackendOptions
from imageclf.preprocess import image_to_model_input
from service.app import ServiceConfig, create_app
from tests.demo_data import draw_shape, make_dataset

from .conftest import REPO, free_port, tiny_graphs_dir, wait_until
from .service_helpers import Server, multipart

MODEL = "shapes"
JSON = {"Content-Type": "application/json"}
# Pictures the front and the local service must classify alike: JPEG, PNG, an EXIF-turned phone-style
# JPEG, and two formats only Pillow decodes (TF Serving's in-graph decoding could not).
FILES = ["circle/circle_001.jpg", "square/square_002.jpg", "triangle.png", "turned.jpg", "photo.tiff",
         "photo.heic"]


class Process:
    """``python -m service`` with some flags, its output in a file."""

    def __init__(self, name: str, args: list[str], log: Path):
        self.name, self.args, self.log = name, args, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(self.port), *self.args],
                                            cwd=REPO, stdout=out, stderr=out, env={**os.environ,
                                                                                   "TF_NUM_INTRAOP_THREADS": "2"})

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, path: str, status: int = 200, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if get(self.url + path)[0] == status:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: {path} never answered {status}:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def get(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get_json(url: str, **kw) -> tuple[int, dict, dict]:
    status, headers, body = get(url, **kw)
    assert headers.get("Content-Type") == "application/json", (status, body[:300])
    return status, headers, json.loads(body)


def metric(text: str, name: str, **labels) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as prometheus_client writes them
    found = re.search(rf"^{re.escape(name)}{{{re.escape(selector)}}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _turned_photo() -> bytes:
    """A phone-style JPEG stored sideways with EXIF orientation 6 (display: turn 90 degrees clockwise)."""
    upright = draw_shape("triangle", np.random.default_rng(11), (240, 180))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(out, "JPEG", quality=92, exif=exif.tobytes())
    return out.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("backend_photos")
    make_dataset(root, per_class=8)
    draw_shape("triangle", np.random.default_rng(5), (90, 70)).save(root / "triangle.png")
    (root / "turned.jpg").write_bytes(_turned_photo())
    square = draw_shape("square", np.random.default_rng(6), (120, 100))
    square.save(root / "photo.tiff")
    square.save(root / "photo.heic", format="HEIF")
    return root


@pytest.fixture(scope="module")
def ports():
    return {"back_grpc": free_port(), "front_grpc": free_port()}


@pytest.fixture(scope="module")
def front(photos, ports, tmp_path_factory):
    """The front, started first (nothing listens on the back's port yet): it loads TensorFlow meanwhile."""
    process = Process("front", ["--backend", f"grpc://127.0.0.1:{ports['back_grpc']}", "--backend_models", MODEL,
                                "--grpc_port", str(ports["front_grpc"]), "--image_root", str(photos),
                                "--backend_timeout_s", "3", "--threads", "4", "--max_instances", "8"],
                      tmp_path_factory.mktemp("front") / "front.log")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def graphs(photos, tiny_module, tmp_path_factory) -> Path:
    return tiny_graphs_dir(photos, tiny_module, tmp_path_factory.mktemp("backend_model"), MODEL)


@pytest.fixture(scope="module")
def back(graphs, photos, ports, tmp_path_factory):
    process = Process("back", ["--graphs_dir", str(graphs), "--grpc_port", str(ports["back_grpc"]),
                               "--image_root", str(photos), "--threads", "4"],
                      tmp_path_factory.mktemp("back") / "back.log")
    process.wait_for("/readyz")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def local(graphs, photos):
    """The same graph served in this process, as python -m service serves it without --backend."""
    server = Server(graphs, photos, threads=4)
    yield server
    server.close()


def version(graphs: Path) -> int:
    return json.loads((graphs / f"{MODEL}.json").read_text())["version"]


def assert_same_answer(front_answer: dict, local_answer: dict) -> None:
    assert front_answer["model"] == local_answer["model"]
    assert list(front_answer["probabilities"]) == list(local_answer["probabilities"])  # labels, in order
    np.testing.assert_allclose(list(front_answer["probabilities"].values()),
                               list(local_answer["probabilities"].values()), rtol=0, atol=1e-5)
    assert [p["label"] for p in front_answer["predictions"]] == [p["label"] for p in local_answer["predictions"]]


def test_front_is_not_ready_until_the_back_serves_the_model(front, request):
    front.wait_for("/healthz")
    status, _, body = get_json(front.url + "/readyz")
    assert status == 503 and MODEL in body["error"], body
    status, headers, body = get_json(front.url + "/?file=circle/circle_000.jpg")
    assert status == 503 and headers.get("Retry-After") == "1" and "unavailable" in body["error"], body
    assert "127.0.0.1" not in body["error"]  # the backend's address stays inside
    (model,) = get_json(front.url + "/models")[2]["models"]
    assert model["name"] == MODEL and model["state"] != "ready" and model["version"] is None

    back = request.getfixturevalue("back")
    assert back.process.poll() is None
    front.wait_for("/readyz", timeout=30)
    (model,) = get_json(front.url + "/models")[2]["models"]
    assert model["state"] == "ready" and model["labels"] == ["circle", "square", "triangle"]
    assert model["input_size"] == [32, 32]


def test_answers_through_the_front_equal_local_serving(front, back, local, graphs, photos, ports):
    front.wait_for("/readyz", timeout=30)
    for name in FILES:
        status, _, answer = get_json(f"{front.url}/?file={name}&top_k=3")
        assert status == 200, (name, answer)
        assert answer["model"] == {"name": MODEL, "version": version(graphs)}
        assert_same_answer(answer, local.json(f"/?file={name}&top_k=3")[1])

    data = (photos / "turned.jpg").read_bytes()
    body, headers = multipart("image", "turned.jpg", data)
    status, _, answer = get_json(front.url + "/classify", data=body, headers=headers)
    assert status == 200 and answer["image"] == "turned.jpg"
    assert_same_answer(answer, local.json("/classify", data=body, headers=headers)[1])
    status, _, answer = get_json(front.url + "/", data=(photos / "photo.heic").read_bytes())
    assert status == 200
    assert_same_answer(answer, local.json("/", data=(photos / "photo.heic").read_bytes())[1])

    # TF Serving's REST API: more instances than one backend call takes (the batch is split).
    instances = [{"b64": base64.b64encode((photos / name).read_bytes()).decode()} for name in FILES + FILES[:2]]
    body = json.dumps({"instances": instances}).encode()
    status, _, answer = get_json(f"{front.url}/v1/models/{MODEL}:predict", data=body, headers=JSON)
    assert status == 200 and len(answer["predictions"]) == 8
    local_rows = local.json(f"/v1/models/{MODEL}:predict", data=body, headers=JSON)[1]["predictions"]
    np.testing.assert_allclose([row["scores"] for row in answer["predictions"]],
                               [row["scores"] for row in local_rows], rtol=0, atol=1e-5)
    assert answer["predictions"][0]["classes"] == ["circle", "square", "triangle"]
    status, _, answer = get_json(f"{front.url}/v1/models/{MODEL}", headers=JSON)
    assert answer["model_version_status"][0]["version"] == str(version(graphs))
    metadata = get_json(f"{front.url}/v1/models/{MODEL}/metadata")[2]["metadata"]["signature_def"]["signature_def"]
    assert [d["size"] for d in metadata["predict_images"]["inputs"]["images"]["tensor_shape"]["dim"]] == \
        ["-1", "32", "32", "3"]
    assert metadata["serving_default"]["outputs"]["classes"]["tensor_shape"]["dim"][1]["size"] == "3"

    # The front's own gRPC API forwards too.
    grpc_request = predict_pb2.PredictRequest()
    grpc_request.model_spec.name = MODEL
    grpc_request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([(photos / "turned.jpg").read_bytes()]))
    with grpc.insecure_channel(f"127.0.0.1:{ports['front_grpc']}") as channel:
        reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(grpc_request, timeout=30)
    assert reply.model_spec.version.value == version(graphs)
    expected = local.json("/?file=turned.jpg")[1]["probabilities"]
    np.testing.assert_allclose(tf.make_ndarray(reply.outputs["scores"])[0], list(expected.values()), rtol=0,
                               atol=1e-5)


def test_every_method_of_the_fronts_own_grpc_api_forwards(front, back, local, graphs, photos, ports):
    """Predict on predict_images (pixels), Classify, GetModelMetadata and GetModelStatus, asked of the front."""
    front.wait_for("/readyz", timeout=30)
    pixels = np.clip(image_to_model_input(np.asarray(Image.open(photos / "triangle.png").convert("RGB")),
                                          (32, 32)), 0, 1)[None]
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = MODEL, "predict_images"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(pixels))
    replies = {}
    for side in ("front_grpc", "back_grpc"):  # the back, asked directly, gives what the front must forward
        with grpc.insecure_channel(f"127.0.0.1:{ports[side]}") as channel:
            replies[side] = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(replies["front_grpc"].outputs["scores"]),
                               tf.make_ndarray(replies["back_grpc"].outputs["scores"]), rtol=0, atol=1e-6)
    assert replies["front_grpc"].model_spec.version.value == version(graphs)

    with grpc.insecure_channel(f"127.0.0.1:{ports['front_grpc']}") as channel:
        prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        example = tf.train.Example()
        example.features.feature["image/encoded"].bytes_list.value.append((photos / "turned.jpg").read_bytes())
        classify = classification_pb2.ClassificationRequest()
        classify.model_spec.name = MODEL
        classify.input.example_list.examples.append(example)
        (result,) = prediction.Classify(classify, timeout=30).result.classifications
        expected = local.json("/?file=turned.jpg")[1]["probabilities"]
        assert [c.label for c in result.classes] == list(expected)
        np.testing.assert_allclose([c.score for c in result.classes], list(expected.values()), rtol=0, atol=1e-5)

        metadata_request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        metadata_request.model_spec.name = MODEL
        metadata = prediction.GetModelMetadata(metadata_request, timeout=30)
        definitions = get_model_metadata_pb2.SignatureDefMap()
        assert metadata.metadata["signature_def"].Unpack(definitions)
        images = definitions.signature_def["predict_images"].inputs["images"]
        assert [d.size for d in images.tensor_shape.dim] == [-1, 32, 32, 3]
        assert metadata.model_spec.version.value == version(graphs)

        status_request = get_model_status_pb2.GetModelStatusRequest()
        status_request.model_spec.name = MODEL
        (status,) = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            status_request, timeout=30).model_version_status
        assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert status.version == version(graphs)
        status_request.model_spec.name = "nope"
        with pytest.raises(grpc.RpcError) as refused:
            model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_front_refuses_bad_requests_itself(front, back):
    front.wait_for("/readyz", timeout=30)

    def predict_calls() -> float:
        return metric(get(front.url + "/metrics")[2].decode(), "imageclf_backend_calls_total", method="Predict",
                      code="OK")
    before = predict_calls()
    for path, status, words in [("/?file=../escape.jpg", 403, "outside the image root"),
                                ("/?file=/etc/passwd", 403, "outside the image root"),
                                ("/?file=missing.jpg", 404, "missing.jpg"),
                                ("/?file=circle/circle_001.jpg&model=nope", 404, "unknown model 'nope'"),
                                ("/?file=circle/circle_001.jpg&top_k=0", 400, "top_k")]:
        got, _, body = get_json(front.url + path)
        assert got == status and words in body["error"], (path, got, body)
    for data, status in [(b"hello", 415), ((REPO / "sample_images" / "circle" / "circle_000.jpg").read_bytes()[:300],
                                           400)]:
        got, _, body = get_json(front.url + "/classify", data=data)
        assert got == status and "Traceback" not in body["error"], body
    body = json.dumps({"instances": [{"b64": "aGVsbG8="}]}).encode()
    assert get_json(f"{front.url}/v1/models/nope:predict", data=body, headers=JSON)[0] == 404
    assert predict_calls() == before  # none of them reached the back


def test_a_model_the_back_does_not_serve_is_404_and_keeps_the_front_unready(back, photos, ports):
    """An in-process front (the same app as python -m service builds) asking for a model the back lacks."""
    config = ServiceConfig(image_root=str(photos), backend=BackendOptions(
        url=f"grpc://127.0.0.1:{ports['back_grpc']}", models=("ghost", MODEL), timeout_s=3))
    app = create_app(config)
    registry = app.extensions["imageclf"]["registry"]
    try:
        client = app.test_client()
        answer = client.get("/?file=circle/circle_001.jpg&model=ghost")
        assert answer.status_code == 404 and "not served by the backend" in answer.json["error"], answer.json
        answer = client.get("/?file=circle/circle_001.jpg&model=shapes")
        assert answer.status_code == 200 and answer.json["model"]["name"] == MODEL
        answer = client.get("/?file=circle/circle_001.jpg")  # the first model named is the default
        assert answer.status_code == 404
        wait_until(lambda: [s for s in registry.statuses() if s.name == "ghost" and s.error], "ghost's error", 20)
        answer = client.get("/readyz")
        assert answer.status_code == 503 and "ghost" in answer.json["error"], answer.json
    finally:
        registry.stop()


def test_calls_are_counted_on_the_front_and_reach_the_back_over_grpc(front, back):
    front.wait_for("/readyz", timeout=30)
    method = "/tensorflow.serving.PredictionService/Predict"

    def counts():
        front_metrics, back_metrics = get(front.url + "/metrics")[2].decode(), get(back.url + "/metrics")[2].decode()
        return (metric(front_metrics, "imageclf_requests_total", endpoint="/", status="200"),
                metric(front_metrics, "imageclf_backend_calls_total", method="Predict", code="OK"),
                metric(front_metrics, "imageclf_backend_call_seconds_count", method="Predict"),
                metric(back_metrics, "imageclf_requests_total", endpoint=method, status="OK"),
                metric(back_metrics, "imageclf_requests_total", endpoint="/", status="200"))
    before = counts()
    assert get(front.url + "/?file=square/square_003.jpg")[0] == 200
    assert np.subtract(counts(), before).tolist() == [1, 1, 1, 1, 0]


# -- a broken or hostile backend: a real gRPC server on 127.0.0.1 whose answers each test sets ------------

class HostileBackend(prediction_service_pb2_grpc.PredictionServiceServicer,
                     model_service_pb2_grpc.ModelServiceServicer):
    """TF Serving's PredictionService and ModelService for one model ``m``, answering as told.

    By default it is well behaved: an ``input`` x ``input`` predict_images signature, version
    ``version``, two labels. ``answer`` (a function of the row count) replaces Predict's
    answers, ``answer_version`` the version they name; ``hang`` (seconds) delays the named
    methods (until ``close``); ``refuse`` makes Predict refuse any input.
    """

    def __init__(self):
        self.input, self.version, self.labels = 8, 1, [b"cat", b"dog"]
        self.answer_version: int | None = None
        self.closed = threading.Event()
        self.answer = None
        self.refuse = False
        self.status_refusal: grpc.StatusCode | None = None  # GetModelStatus aborts with it
        self.hang: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.called = {name: threading.Event() for name in ("GetModelStatus", "GetModelMetadata", "Predict")}
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(self, self.server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.url = f"grpc://127.0.0.1:{self.port}"
        self.server.start()

    def _enter(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        self.called[method].set()
        self.closed.wait(self.hang.get(method, 0))

    def GetModelStatus(self, request, context):
        self._enter("GetModelStatus")
        if self.status_refusal is not None:
            context.abort(self.status_refusal, "too many calls")
        state = get_model_status_pb2.ModelVersionStatus
        return get_model_status_pb2.GetModelStatusResponse(
            model_version_status=[state(version=self.version, state=state.AVAILABLE)])

    def GetModelMetadata(self, request, context):
        self._enter("GetModelMetadata")
        definitions = get_model_metadata_pb2.SignatureDefMap()
        signature = definitions.signature_def["predict_images"]
        images = signature.inputs["images"]
        images.name, images.dtype = "images:0", tf.float32.as_datatype_enum
        images.tensor_shape.CopyFrom(tf.TensorShape([None, self.input, self.input, 3]).as_proto())
        signature.outputs["scores"].name = "scores:0"
        signature.outputs["classes"].name = "classes:0"
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name, response.model_spec.version.value = "m", self.version
        response.metadata["signature_def"].Pack(definitions)
        return response

    def Predict(self, request, context):
        self._enter("Predict")
        images = tf.make_ndarray(request.inputs["images"])
        if self.refuse or images.shape[1:] != (self.input, self.input, 3):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"images must be [n, {self.input}, {self.input}, 3]")
        n = len(images)
        response = self.answer(n) if self.answer else _answer(np.full((n, len(self.labels)), 0.5), [self.labels] * n)
        response.model_spec.name, response.model_spec.version.value = "m", self.answer_version or self.version
        return response

    def close(self) -> None:
        self.closed.set()
        self.server.stop(0)


def _answer(scores, classes) -> predict_pb2.PredictResponse:
    response = predict_pb2.PredictResponse()
    response.outputs["scores"].CopyFrom(tf.make_tensor_proto(np.asarray(scores, np.float32)))
    response.outputs["classes"].CopyFrom(tf.make_tensor_proto(np.asarray(classes, object)))
    return response


def _one_value_for(shape: list[int]) -> predict_pb2.PredictResponse:
    """Scores declared ``shape`` with one value: tf.make_ndarray would repeat it to fill the shape."""
    response = _answer([[0.5, 0.5]], [[b"cat", b"dog"]])
    scores = response.outputs["scores"]
    scores.ClearField("tensor_content")
    scores.float_val.append(0.5)
    scores.tensor_shape.CopyFrom(tf.TensorShape(shape).as_proto())
    return response


@pytest.fixture
def hostile():
    backend = HostileBackend()
    yield backend
    backend.close()


def front_of(backend: HostileBackend, timeout_s: float = 2, poll_seconds: float = 0.2):
    """An in-process front over ``backend`` (the app python -m service --backend builds)."""
    config = ServiceConfig(image_root=str(REPO / "sample_images"), backend=BackendOptions(
        url=backend.url, models=("m",), timeout_s=timeout_s, poll_seconds=poll_seconds))
    return create_app(config)


@contextlib.contextmanager
def running_front(backend: HostileBackend, **kw):
    app = front_of(backend, **kw)
    try:
        yield app.test_client()
    finally:
        app.extensions["imageclf"]["registry"].stop()


PICTURE = "/?file=circle/circle_000.jpg"

GARBAGE = {
    "NaN scores": lambda n: _answer(np.full((n, 2), np.nan), [[b"cat", b"dog"]] * n),
    "a row too many": lambda n: _answer(np.full((n + 1, 2), 0.5), [[b"cat", b"dog"]] * (n + 1)),
    "more labels than scores": lambda n: _answer(np.full((n, 2), 0.5), [[b"cat", b"dog", b"cow"]] * n),
    "one label twice": lambda n: _answer(np.full((n, 2), 0.5), [[b"cat", b"cat"]] * n),
    "no classes at all": lambda n: _answer(np.zeros((n, 0)), np.zeros((n, 0), object)),
    # 10^10 scores declared, one sent: filling that in would take 40 GB.
    "a huge declared shape": lambda n: _one_value_for([n, 10 ** 10]),
    "labels over 4 MiB": lambda n: _answer(np.full((n, 2), 0.5), [[b"cat", b"x" * (5 << 20)]] * n),
}


@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_a_backend_answering_garbage_is_502_json(hostile, garbage):
    with running_front(hostile) as client:
        answer = client.get(PICTURE)
        assert answer.status_code == 200 and answer.json["probabilities"] == {"cat": 0.5, "dog": 0.5}, answer.json
        hostile.answer = GARBAGE[garbage]
        answer = client.get(PICTURE)
        assert answer.status_code == 502 and "backend" in answer.json["error"], (answer.status_code, answer.data)
        assert client.get("/healthz").status_code == 200
        hostile.answer = None
        assert client.get(PICTURE).status_code == 200


def test_absurd_input_size_in_the_metadata_is_refused_not_allocated(hostile):
    hostile.input = 100_000  # a warm-up picture of 100000 x 100000 x 3 float32 would be 120 GB
    with running_front(hostile) as client:
        answer = client.get(PICTURE)
        assert answer.status_code == 502 and "at most 2048 pixels a side" in answer.json["error"], answer.json
        assert "Predict" not in hostile.calls
        assert client.get("/readyz").status_code == 503


def test_a_backend_that_refuses_what_its_metadata_asked_for_is_not_the_clients_fault(hostile):
    with running_front(hostile, poll_seconds=60) as client:
        assert client.get(PICTURE).status_code == 200
        hostile.input = 16  # restarted with another model, same version: the front's metadata is stale
        answer = client.get(PICTURE)
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1", answer.json
        assert "metadata is fetched again" in answer.json["error"]
        assert client.get(PICTURE).status_code == 200  # the retry: fetched for 16 x 16

        hostile.refuse = True  # refuses everything, the warm-up picture too: broken, not a bad request
        assert client.get(PICTURE).status_code == 503
        answer = client.get(PICTURE)
        assert answer.status_code == 502 and "refuses a picture" in answer.json["error"], answer.json


def test_requests_waiting_for_a_hung_metadata_fetch_share_its_failure(hostile):
    """Requests that arrive while the model's first fetch hangs do not each ask the backend again in turn."""
    hostile.hang["GetModelMetadata"] = 30  # beyond the 1 s deadline
    app = front_of(hostile, timeout_s=1, poll_seconds=60)
    try:
        assert hostile.called["GetModelMetadata"].wait(10)  # the poller's fetch is in flight
        with futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: app.test_client().get(PICTURE), range(4)))
        assert [a.status_code for a in answers] == [503] * 4
        assert all("did not answer within 1 s" in a.json["error"] and a.headers["Retry-After"] == "1"
                   for a in answers), [a.json for a in answers]
        assert hostile.calls["GetModelMetadata"] == 1
    finally:
        app.extensions["imageclf"]["registry"].stop()


def test_a_hung_backend_is_answered_at_once_while_the_poll_cannot_reach_it(hostile):
    """Requests do not each hold a thread for the deadline to learn what the last status poll learned."""
    with running_front(hostile, timeout_s=1, poll_seconds=0.1) as client:
        assert client.get(PICTURE).status_code == 200
        hostile.hang.update(GetModelStatus=30, Predict=30)
        wait_until(lambda: client.get("/readyz").status_code == 503, "/readyz 503 after the hang", 20)
        calls = hostile.calls["Predict"]
        for _ in range(5):
            answer = client.get(PICTURE)
            assert answer.status_code == 503 and answer.headers["Retry-After"] == "1", answer.json
            assert "did not answer within 1 s" in answer.json["error"]
        assert hostile.calls["Predict"] == calls  # none of them waited on the backend
        assert client.get("/healthz").status_code == 200

        hostile.hang.clear()  # back: the poll notices, and requests are answered again
        wait_until(lambda: client.get("/readyz").status_code == 200, "/readyz 200 after the hang ended", 20)
        assert client.get(PICTURE).status_code == 200


def test_a_busy_status_poll_does_not_turn_requests_away(hostile):
    """A backend that refuses the poll as busy (RESOURCE_EXHAUSTED) is not down: requests still call it."""
    with running_front(hostile, poll_seconds=0.05) as client:
        assert client.get(PICTURE).status_code == 200
        hostile.status_refusal = grpc.StatusCode.RESOURCE_EXHAUSTED
        polls = hostile.calls["GetModelStatus"]
        wait_until(lambda: hostile.calls["GetModelStatus"] >= polls + 3, "3 more status polls")
        calls = hostile.calls["Predict"]
        answer = client.get(PICTURE)
        assert answer.status_code == 200, answer.json
        assert hostile.calls["Predict"] == calls + 1

        hostile.status_refusal = grpc.StatusCode.UNAVAILABLE  # unreachable: answered at once
        polls = hostile.calls["GetModelStatus"]
        wait_until(lambda: hostile.calls["GetModelStatus"] >= polls + 3, "3 more status polls")
        answer = client.get(PICTURE)
        assert answer.status_code == 503 and hostile.calls["Predict"] == calls + 1, answer.json


def test_status_and_answers_naming_other_versions_do_not_refetch_at_every_poll(hostile):
    hostile.version, hostile.answer_version = 7, 6  # the status says 7, the answers 6
    with running_front(hostile, poll_seconds=0.05) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, "/readyz 200")
        answer = client.get(PICTURE)
        assert answer.status_code == 200 and answer.json["model"]["version"] == 6
        fetches, polls = hostile.calls["GetModelMetadata"], hostile.calls["GetModelStatus"]
        wait_until(lambda: hostile.calls["GetModelStatus"] >= polls + 10, "10 more status polls")
        assert hostile.calls["GetModelMetadata"] == fetches


def test_stop_does_not_wait_for_a_hung_status_call(hostile):
    hostile.hang["GetModelStatus"] = 60
    app = front_of(hostile, timeout_s=60)
    registry = app.extensions["imageclf"]["registry"]
    assert hostile.called["GetModelStatus"].wait(10)
    stopping = threading.Thread(target=registry.stop)
    stopping.start()
    stopping.join(20)  # far below the 60 s deadline the call would otherwise run to
    assert not stopping.is_alive()


def test_a_backend_that_stays_away_does_not_flood_the_log(caplog):
    closed = free_port()
    options = BackendOptions(url=f"grpc://127.0.0.1:{closed}", models=("m",), timeout_s=1, poll_seconds=0.01)
    with caplog.at_level(logging.WARNING, logger="imageclf.engine.backend"):
        app = create_app(ServiceConfig(image_root=str(REPO / "sample_images"), backend=options))
        client = app.test_client()
        try:
            for _ in range(20):
                assert client.get(PICTURE).status_code == 503
            time.sleep(1)  # some 100 status polls
        finally:
            app.extensions["imageclf"]["registry"].stop()
    lines = [r for r in caplog.records if "failed: UNAVAILABLE" in r.getMessage()]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in caplog.records]


def test_back_down_is_503_json_and_the_front_recovers(front, back, local):
    front.wait_for("/readyz", timeout=30)
    back.stop()  # SIGKILL: no goodbye
    status, headers, body = get_json(front.url + "/?file=circle/circle_002.jpg")
    assert status == 503 and headers.get("Retry-After") == "1" and "retry" in body["error"], body
    front.wait_for("/readyz", status=503, timeout=30)
    assert get(front.url + "/healthz")[0] == 200  # alive: do not restart the front for it
    assert get_json(front.url + "/models")[2]["models"][0]["state"] == "unavailable"

    back.start()
    back.wait_for("/readyz")
    front.wait_for("/readyz", timeout=30)
    status, _, answer = get_json(front.url + "/?file=circle/circle_002.jpg")
    assert status == 200
    assert_same_answer(answer, local.json("/?file=circle/circle_002.jpg")[1])
    text = get(front.url + "/metrics")[2].decode()
    assert metric(text, "imageclf_errors_total", kind="backend_unavailable") >= 1
    assert metric(text, "imageclf_requests_total", endpoint="/", status="500") == 0


def _half_sent_upload(url: str, data: bytes) -> tuple[socket.socket, bytes]:
    """A connection with a POST /classify whose body is half sent; returns it and the other half."""
    port = int(url.rsplit(":", 1)[1])
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    # One whole request first: its answer proves the server accepted the connection (one still in
    # the listen backlog when the listener closes is reset, which is not what is tested here).
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert _response(conn)[0] == 200
    head = (f"POST /classify HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    half = len(data) // 2
    conn.sendall(head + data[:half])
    return conn, data[half:]


def _response(conn: socket.socket) -> tuple[int, dict]:
    raw = b""
    while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < int(
            re.search(rb"Content-Length: (\d+)", raw, re.I).group(1)):
        chunk = conn.recv(65536)
        if not chunk:
            break
        raw += chunk
    head, body = raw.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def _refuses_connections(url: str, timeout: float = 10) -> bool:
    port = int(url.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("which", ["front", "back"])
def test_sigterm_finishes_the_request_in_progress_and_exits_0(which, front, back, local, photos):
    """Last in this file: it stops the processes. The front is stopped first, while the back still answers."""
    process = {"front": front, "back": back}[which]
    process.wait_for("/readyz", timeout=30)
    data = (photos / "turned.jpg").read_bytes()
    conn, rest = _half_sent_upload(process.url, data)
    with conn:
        process.process.send_signal(signal.SIGTERM)
        assert _refuses_connections(process.url)  # stopped accepting...
        conn.sendall(rest)  # ...but the request already being received is answered
        status, answer = _response(conn)
    assert status == 200, answer
    assert_same_answer(answer, local.json("/classify", data=data)[1])
    assert process.process.wait(timeout=30) == 0
    output = process.output()
    assert "SIGTERM: stopping" in output and "Stopped." in output and "Traceback" not in output, output[-3000:]
