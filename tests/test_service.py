"""The service over real HTTP on 127.0.0.1, with real graphs."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from imageclf import label_image_cli
from imageclf.graph_model import GraphModel
from imageclf.retrain import retrain
from tests.demo_data import make_dataset

from .conftest import POETS, REPO, needs_shared, quick_options, reference_input, run_in_process
from .service_helpers import Server, multipart


@pytest.fixture(scope="module")
def served(demo_model, tmp_path_factory):
    graphs = tmp_path_factory.mktemp("graphs")
    shutil.copy(demo_model.graph, graphs / "shapes.pb")
    root = tmp_path_factory.mktemp("images")
    shutil.copytree(REPO / "sample_images", root / "pictures")
    (root / "escape").symlink_to("/etc")
    server = Server(graphs, root, max_upload_bytes=2_000_000, max_pixels=4_000_000)
    yield server, root
    server.close()


def test_classify_by_path_matches_label_image(served, demo_model):
    server, root = served
    status, answer = server.json("/?file=pictures/circle/circle_003.jpg&top_k=2")
    assert status == 200
    assert answer["model"]["name"] == "shapes" and answer["model"]["version"] > 0
    cli = run_in_process("label_image.py", label_image_cli.main, "--graph", str(demo_model.graph), "--json",
                         "--image", str(root / "pictures" / "circle" / "circle_003.jpg"))
    expected = json.loads(cli.stdout)["predictions"][:2]
    assert [p["label"] for p in answer["predictions"]] == [p["label"] for p in expected]
    for got, want in zip(answer["predictions"], expected, strict=True):
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert answer["time_ms"]["total"] > 0


def test_upload_multipart_and_raw_body_answer_the_same(served):
    server, root = served
    data = (root / "pictures" / "square" / "square_004.jpg").read_bytes()
    body, headers = multipart("image", "sq.jpg", data)
    _, by_form = server.json("/classify", data=body, headers=headers)
    _, by_body = server.json("/", data=data, headers={"Content-Type": "image/jpeg"})
    _, by_path = server.json("/?file=pictures/square/square_004.jpg")
    assert by_form["predictions"][0]["label"] == "square" and by_form["image"] == "sq.jpg"
    assert by_form["probabilities"] == by_body["probabilities"] == by_path["probabilities"]


@pytest.mark.parametrize("path", ["../outside.jpg", "/etc/passwd", "escape/passwd", "pictures/../../x.jpg"])
def test_paths_outside_the_root_are_refused(served, path):
    server, _ = served
    (served[1].parent / "outside.jpg").write_bytes(b"secret")
    status, answer = server.json("/?file=" + urllib.request.quote(path))
    assert status == 403 and "outside the image root" in answer["error"]


JSON = {"Content-Type": "application/json"}


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("request_args, status, message", [
    (dict(path="/?file=pictures/nothing.jpg"), 404, "no such file"),
    (dict(path="/?file="), 400, "empty 'file'"),
    (dict(path="/"), 400, "missing 'file' parameter"),
    (dict(path="/?file=pictures/circle/circle_000.jpg&model=nope"), 404, "unknown model 'nope'"),
    (dict(path="/?file=pictures/circle/circle_000.jpg&top_k=zero"), 400, "top_k must be a positive integer"),
    (dict(path="/classify", data=b"%PDF-1.4 not an image"), 415, "not an image"),
    (dict(path="/classify", data=b""), 400, "empty upload"),
    (dict(path="/classify", data=(REPO / "sample_images/circle/circle_000.jpg").read_bytes()[:900]), 400,
     "truncated or corrupt"),
    (dict(path="/classify", data=b"\xff" * 2_050_000), 413, "over the 2,000,000 byte limit"),
    (dict(path="/classify", data=_png((3000, 3000))), 400, "over the limit of 4,000,000 pixels"),
    (dict(path="/classify", method="PUT", data=b"x"), 405, "method PUT is not allowed"),
    (dict(path="/nowhere"), 404, "no such endpoint"),
    (dict(path="/v1/models/shapes:predict", data=b"{}", headers=JSON), 400, "instances"),
    (dict(path="/v1/models/shapes:predict", data=b'{"instances": [{"b64": "***"}]}', headers=JSON), 400,
     "invalid base64"),
])
def test_bad_requests_get_json_errors(served, request_args, status, message):
    server, _ = served
    got, answer = server.json(request_args.pop("path"), **request_args)
    assert got == status and message in answer["error"]


def test_tf_serving_rest(served, demo_model):
    server, root = served
    image = (root / "pictures" / "triangle" / "triangle_005.jpg").read_bytes()
    status, answer = server.json("/v1/models/shapes")
    assert status == 200 and answer["model_version_status"][0]["state"] == "AVAILABLE"
    status, answer = server.json("/v1/models/shapes/metadata")
    outputs = answer["metadata"]["signature_def"]["signature_def"]["serving_default"]["outputs"]
    assert outputs["classes"]["tensor_shape"]["dim"][1] == {"size": "3", "name": ""}
    body = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}] * 2}).encode()
    status, answer = server.json("/v1/models/shapes:predict", data=body, headers=JSON)
    expected = GraphModel(demo_model.graph).predict_encoded([image])[0]
    assert status == 200 and answer["predictions"][0]["classes"] == ["circle", "square", "triangle"]
    assert np.allclose([row["scores"] for row in answer["predictions"]], [expected, expected], atol=1e-4)
    status, answer = server.json("/v1/models/shapes:classify", data=body, headers=JSON)
    assert status == 200 and answer["results"][0][2][0] == "triangle"
    assert answer["results"][0][2][1] == pytest.approx(float(expected[2]), abs=1e-4)


def test_health_models_and_metrics(served):
    server, _ = served
    assert server.json("/healthz") == (200, {"status": "alive"})
    assert server.json("/readyz")[0] == 200
    _, models = server.json("/models")
    (entry,) = models["models"]
    assert entry["name"] == "shapes" and entry["state"] == "ready" and entry["labels"][0] == "circle"
    assert entry["last_error"] is None and entry["load_seconds"] > 0
    server.request("/?file=pictures/circle/circle_000.jpg")
    server.request("/nowhere")
    status, kind, body = server.request("/metrics")
    text = body.decode()
    assert status == 200 and kind == "text/plain"
    assert 'imageclf_requests_total{endpoint="/",status="200"}' in text
    assert "imageclf_request_seconds_bucket" in text and 'imageclf_model_reloads_total{model="shapes"' in text
    assert re.search(r'^imageclf_errors_total{kind="not_found"} [1-9]', text, re.M)


def test_browser_page_is_served_to_browsers(served):
    server, _ = served
    status, kind, body = server.request("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert status == 200 and kind == "text/html" and b"Drop an image here" in body


def test_not_ready_without_graphs(tmp_path):
    server = Server(tmp_path, tmp_path)
    try:
        assert server.json("/readyz")[0] == 503
        status, answer = server.json("/classify", data=(REPO / "sample_images/circle/circle_000.jpg").read_bytes())
        assert status == 503 and "no model is loaded" in answer["error"]
    finally:
        server.close()


def _wait_for(predicate, seconds=60.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_hot_reload_while_answering(tmp_path, tiny_module):
    data, graphs = tmp_path / "data", tmp_path / "graphs"
    make_dataset(data, per_class=8)
    opts = quick_options(data, tmp_path, tfhub_module=str(tiny_module))
    opts.output_graph = str(graphs / "live.pb")
    retrain(opts, log=lambda s: None)
    server = Server(graphs, data)
    failures, answers, stop, removing = [], [], threading.Event(), threading.Event()

    def client():
        while not stop.is_set():
            status, body = server.json("/?file=circle/circle_001.jpg")
            if status == 200:
                answers.append(body)
            else:  # answered before the graph's removal began: a gap in serving, never allowed
                failures.append((removing.is_set(), status, body))
    threads = [threading.Thread(target=client) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        assert _wait_for(lambda: len(answers) > 5)
        make_dataset(data, per_class=8, classes=("star",))
        retrain(opts, log=lambda s: None)
        assert _wait_for(lambda: answers and "star" in answers[-1]["probabilities"])
        # A broken replacement keeps the good version serving and reports the error.
        (graphs / "live.pb").write_bytes(b"not a graph")
        assert _wait_for(lambda: server.json("/models")[1]["models"][0]["last_error"])
        count = len(answers)
        assert _wait_for(lambda: len(answers) > count + 3)
        assert "star" in answers[-1]["probabilities"]
        # A removed graph stops being served.
        assert not failures, failures[:3]  # no gap: every request so far was answered by some version
        removing.set()
        (graphs / "live.pb").unlink()
        assert _wait_for(lambda: server.json("/readyz")[0] == 503)
    finally:
        stop.set()
        for t in threads:
            t.join()
        server.close()
    assert not [f for f in failures if not f[0]], failures[:3]
    assert all(status == 503 and "no model is loaded" in body["error"] for _, status, body in failures), failures[:3]


@needs_shared
def test_poets_graph_served_with_its_settings_file(tmp_path):
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    shutil.copy(POETS / "retrained_graph.pb", graphs / "defects.pb")
    shutil.copy(POETS / "retrained_labels.txt", graphs / "defects.labels.txt")
    (graphs / "defects.json").write_text(json.dumps({
        "input_tensor": "input:0", "output_tensor": "final_result:0", "input_mean": 127.5, "input_std": 127.5,
        "labels_file": "defects.labels.txt"}))
    server = Server(graphs, POETS / "sample_images")
    try:
        status, answer = server.json("/?file=scratch2.png")
        assert status == 200 and answer["predictions"][0]["label"] == "61326 wrinkle"
        assert answer["predictions"][0]["score"] == pytest.approx(0.977, abs=0.02)
    finally:
        server.close()


def test_poets_like_graph_served_with_its_settings_file(tmp_path, poets_like_graph):
    """A batch-1 graph from the older scripts, with a <name>.json: served without flags."""
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    shutil.copy(poets_like_graph.graph, graphs / "defects.pb")
    shutil.copy(poets_like_graph.labels_file, graphs / "defects.labels.txt")
    (graphs / "defects.json").write_text(json.dumps(poets_like_graph.settings_json("defects.labels.txt")))
    image = poets_like_graph.folder / "sample_images" / "scratch2.png"
    model = GraphModel(graphs / "defects.pb")
    try:
        expected = model.session.run(model.output, {model.input: reference_input(image, (128, 128))})[0]
    finally:
        model.close()
    server = Server(graphs, image.parent)
    try:
        status, answer = server.json("/?file=scratch2.png")
        assert status == 200 and answer["predictions"][0]["label"] == "part wrinkle"
        for label, score in zip(poets_like_graph.labels, expected, strict=True):
            assert answer["probabilities"][label] == pytest.approx(float(score), abs=0.02)  # TF vs Pillow resize
    finally:
        server.close()


@pytest.mark.parametrize("args, message", [
    (["--graphs_dir", "/nonexistent/graphs"], "no such folder"),
    (["--memory_budget_mb", "0"], "--memory_budget_mb must be positive"),
    (["--channel_timeout", "-1"], "--channel_timeout must be positive"),
])
def test_service_command_refuses_bad_settings(args, message):
    result = subprocess.run([sys.executable, "-m", "service", *args],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_concurrent_requests_each_get_their_own_answer(served):
    server, root = served
    files = [f"pictures/{kind}/{kind}_{i:03d}.jpg" for kind in ("circle", "square", "triangle") for i in range(6)]
    alone = {f: server.json("/?file=" + f)[1]["probabilities"] for f in files}
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda f: server.json("/?file=" + f)[1]["probabilities"], files * 3))
    for f, got in zip(files * 3, together, strict=True):
        for label, p in got.items():
            assert p == pytest.approx(alone[f][label], abs=1e-5)
