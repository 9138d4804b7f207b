"""The LiteRT runtime: the same answers as the TensorFlow session, safe under threads, reloaded, and
a service that never loads TensorFlow."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from imageclf.classifier import GraphSettings
from imageclf.graph_model import GraphModel
from imageclf.images import decode_image
from imageclf.litert_model import LiteModel, LiteOptions, cache_key
from imageclf.retrain import retrain
from imageclf.runtimes import RuntimeOptions, load_classifier
from imageclf.training import TrainConfig
from tests.demo_data import SHAPES, draw_shape, make_dataset

from .conftest import REPO, free_port, quick_options, run_tool, wait_until
from .service_helpers import Server, multipart

pytest.importorskip("ai_edge_litert")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("litert_cache")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> list[Path]:
    """Pictures no graph here was trained on: other seeds, other sizes (upscaled and shrunk)."""
    folder = tmp_path_factory.mktemp("held_out")
    paths = []
    for i, kind in enumerate(SHAPES * 3):
        path = folder / f"{kind}_{i}.jpg"
        draw_shape(kind, np.random.default_rng([99, i]), (90 + 70 * i, 60 + 50 * i)).save(path, quality=92)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def frozen_base_graph(frozen_base, tmp_path_factory) -> Path:
    """A graph retrained on a frozen-graph base (the Poets bases' kind)."""
    out = tmp_path_factory.mktemp("frozen_base_graph")
    make_dataset(out / "images", per_class=8)
    opts = quick_options(out / "images", out, tfhub_module=str(frozen_base.graph), frozen_base=frozen_base.spec(),
                         training=TrainConfig(steps=100, eval_step_interval=100, progress=False))
    opts.output_graph = str(out / "graphs" / "frozen.pb")
    return retrain(opts, log=lambda line: None).graph


def _cases(request, demo_model, frozen_base_graph, poets_like_graph):
    if request.param == "builtin":
        return demo_model.graph, None
    if request.param == "frozen_base":
        return frozen_base_graph, None
    return poets_like_graph.graph, GraphSettings(input_mean=127.5, input_std=127.5,
                                                 labels_file=str(poets_like_graph.labels_file))


@pytest.fixture(params=["builtin", "frozen_base", "poets"])
def graph_case(request, demo_model, frozen_base_graph, poets_like_graph):
    return _cases(request, demo_model, frozen_base_graph, poets_like_graph)


def test_scores_match_the_session_on_the_same_pixels(graph_case, held_out, cache):
    graph, settings = graph_case
    session = GraphModel(graph, settings, decode_in_graph=False)
    lite = LiteModel(graph, settings, LiteOptions(threads=2, cache_dir=str(cache)))
    try:
        assert lite.labels == session.labels and lite.input_size == session.input_size
        assert (lite.input_mean, lite.input_std, lite.batchable) == (session.input_mean, session.input_std,
                                                                       session.batchable)
        batch = np.stack([session.model_input(decode_image(p.read_bytes(), size=session.input_size))
                          for p in held_out])
        expected, got = session.run(batch), lite.run(batch)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
        assert (got.argmax(1) == expected.argmax(1)).all()
        one = lite.run(batch[:1])  # a batch of another size: the interpreter is resized and still right
        np.testing.assert_allclose(one, expected[:1], rtol=0, atol=1e-4)
    finally:
        session.close()
        lite.close()


def test_concurrent_calls_of_any_batch_size_get_their_own_answers(demo_model, held_out, cache):
    lite = LiteModel(demo_model.graph, options=LiteOptions(threads=1, interpreters=2, cache_dir=str(cache)))
    inputs = np.stack([lite.model_input(decode_image(p.read_bytes(), size=lite.input_size)) for p in held_out])
    alone = lite.run(inputs)
    jobs = [(start, 1 + (start * 5) % 4) for start in range(len(held_out) - 4)] * 8  # 1-4 rows, 8 times each

    def call(job):
        start, size = job
        return start, size, lite.run(inputs[start:start + size])

    with ThreadPoolExecutor(8) as pool:
        for start, size, got in pool.map(call, jobs):
            np.testing.assert_allclose(got, alone[start:start + size], rtol=0, atol=1e-6)


def test_conversion_is_cached_by_what_decides_it(poets_like_graph, tmp_path):
    folder = tmp_path / "graph"
    shutil.copytree(poets_like_graph.folder, folder)
    graph = folder / "retrained_graph.pb"
    settings = GraphSettings(input_mean=127.5, input_std=127.5, labels_file="retrained_labels.txt")
    options = LiteOptions(cache_dir=str(tmp_path / "cache"))
    LiteModel(graph, settings, options).close()
    (model_file,) = (tmp_path / "cache").glob("*.tflite")
    written = model_file.stat().st_mtime_ns
    LiteModel(graph, settings, options).close()
    assert model_file.stat().st_mtime_ns == written  # used again, not converted again
    key = cache_key(graph, settings)
    (folder / "retrained_labels.txt").write_text("".join(f"renamed {i}\n" for i in range(5)))
    assert cache_key(graph, settings) != key  # the labels are part of the model
    assert LiteModel(graph, settings, options).labels[0] == "renamed 0"
    assert cache_key(graph, GraphSettings(input_mean=128.0, input_std=128.0, labels_file="retrained_labels.txt")) \
        not in (key, cache_key(graph, settings))


def _unconvertible_graph(path: Path) -> Path:
    """A graph with an op LiteRT has no kernel for (igamma), on the path from pixels to scores."""
    graph = tf.Graph()
    with graph.as_default():
        pixels = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="Placeholder")
        scores = tf.math.igamma(tf.reduce_mean(pixels, [1, 2]) + 1.0, tf.constant([[1.0, 2.0, 3.0]]))
        tf.nn.softmax(scores, name="final_result")
        tf.constant(["a", "b", "c"], name="labels")
        tf.constant(json.dumps({"name": "odd", "input_size": [8, 8], "input_mean": 0.0, "input_std": 255.0,
                                "input_tensor": "Placeholder:0", "output_tensor": "final_result:0"}), name="metadata")
    path.write_bytes(graph.as_graph_def().SerializeToString())
    return path


def test_a_graph_litert_cannot_run_is_served_by_tensorflow_saying_why(tmp_path):
    graph = _unconvertible_graph(tmp_path / "odd.pb")
    options = RuntimeOptions("litert", cache_dir=str(tmp_path / "cache"))
    model = load_classifier(graph, options=options)
    assert model.runtime == "tf" and "Igamma" in model.runtime_note
    assert model.predict([np.zeros((8, 8, 3), np.uint8)]).shape == (1, 3)
    # The refusal is remembered: the next load (a reload, a restart) does not convert again.
    (refused,) = (tmp_path / "cache").glob("*.refused")
    assert "Igamma" in refused.read_text()
    again = load_classifier(graph, options=options)
    assert again.runtime == "tf" and again.runtime_note == model.runtime_note


def test_service_on_litert_answers_reloads_and_says_its_runtime(demo_model, frozen_base_graph, held_out, cache,
                                                               tmp_path):
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    shutil.copy(demo_model.graph, graphs / "live.pb")
    server = Server(graphs, held_out[0].parent, runtime=RuntimeOptions("litert", threads=1, interpreters=2,
                                                                      cache_dir=str(cache)))
    try:
        wait_until(lambda: server.json("/readyz")[0] == 200, "the model is served")
        _, models = server.json("/models")
        assert [(m["runtime"], m["runtime_note"]) for m in models["models"]] == [("litert", None)]
        session = GraphModel(demo_model.graph, decode_in_graph=False)
        for path in held_out[:3]:
            body, headers = multipart("image", path.name, path.read_bytes())
            status, answer = server.json("/classify", data=body, headers=headers)
            expected = session.predict([decode_image(path.read_bytes(), size=session.input_size)])[0]
            assert status == 200
            np.testing.assert_allclose([answer["probabilities"][label] for label in session.labels], expected,
                                       rtol=0, atol=1e-4)
        # TensorFlow Serving's REST API on the same model.
        encoded = [base64.b64encode(p.read_bytes()).decode() for p in held_out[:2]]
        status, answer = server.json("/v1/models/live:predict", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"instances": [{"b64": e} for e in encoded]}).encode())
        expected = session.predict([decode_image(p.read_bytes(), size=session.input_size) for p in held_out[:2]])
        assert status == 200
        np.testing.assert_allclose([row["scores"] for row in answer["predictions"]], expected, rtol=0, atol=1e-4)
        # Concurrent uploads go through the batcher and the interpreter pool.
        body, headers = multipart("image", "a.jpg", held_out[4].read_bytes())
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: server.json("/classify", data=body, headers=headers)[0], range(32)))
        assert statuses == [200] * 32
        # Hot reload: another graph under the same name is converted and served; the old one closed.
        old = server.registry.statuses()[0].served
        version = models["models"][0]["version"]
        shutil.copy(frozen_base_graph, graphs / "live.pb.tmp")
        (graphs / "live.pb.tmp").replace(graphs / "live.pb")
        wait_until(lambda: server.json("/models")[1]["models"][0]["version"] != version, "the new graph is served")
        _, models = server.json("/models")
        assert models["models"][0]["runtime"] == "litert" and models["models"][0]["input_size"] == [48, 48]
        status, answer = server.json(f"/?file={held_out[1].name}")
        assert status == 200 and answer["model"]["version"] == models["models"][0]["version"]
        wait_until(lambda: old.closed, "the old version's interpreters are let go")
    finally:
        server.close()


def test_grpc_predict_on_litert(demo_model, held_out, cache, tmp_path):
    from tensorflow_serving.apis import predict_pb2

    from .test_grpc import Service

    graphs = tmp_path / "graphs"
    graphs.mkdir()
    shutil.copy(demo_model.graph, graphs / "shapes.pb")
    service = Service(graphs, held_out[0].parent, runtime=RuntimeOptions("litert", cache_dir=str(cache)))
    try:
        wait_until(lambda: service.http.json("/readyz")[0] == 200, "the model is served")
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "shapes"
        request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([held_out[2].read_bytes()]))
        scores = tf.make_ndarray(service.prediction.Predict(request, timeout=30).outputs["scores"])
        session = GraphModel(demo_model.graph, decode_in_graph=False)
        expected = session.predict([decode_image(held_out[2].read_bytes(), size=session.input_size)])
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4)
    finally:
        service.close()


def test_litert_service_process_never_loads_tensorflow(demo_model, held_out, tmp_path):
    """HTTP alone on LiteRT: the graph is converted in a child process, and the service's own memory
    holds no TensorFlow library (its size is measured in benchmarks/bench_service.py)."""
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    shutil.copy(demo_model.graph, graphs / "shapes.pb")
    port, log = free_port(), tmp_path / "service.log"
    env = {"IMAGECLF_LITERT_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service", "--graphs_dir", str(graphs), "--port", str(port),
                                 "--grpc_port", "0", "--runtime", "litert", "--image_root", str(held_out[0].parent)],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: b"Serving" in log.read_bytes() or proc.poll() is not None, "the service starts", 120)
        import urllib.request

        def answer():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/?file={held_out[0].name}", timeout=30) as r:
                return json.loads(r.read())

        deadline = time.monotonic() + 120
        while True:  # the first load converts the graph in a child process
            try:
                got = answer()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError(log.read_text()) from None
                time.sleep(0.2)
        assert got["predictions"][0]["label"] == held_out[0].name.split("_")[0]
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtensorflow" not in maps and "_pywrap_tensorflow" not in maps
        assert list((tmp_path / "cache").glob("*.tflite"))
    finally:
        proc.terminate()
        proc.wait(30)


def test_label_image_litert_prints_what_tf_prints(poets_like_graph, monkeypatch, cache):
    monkeypatch.setenv("IMAGECLF_LITERT_CACHE_DIR", str(cache))
    flags = [*poets_like_graph.flags(), "--input_mean", "127.5", "--input_std", "127.5", "--json",
             "--image", str(poets_like_graph.sample_images[1])]
    by_tf = json.loads(run_tool("label_image.py", *flags).stdout)["predictions"]
    by_litert = json.loads(run_tool("label_image.py", *flags, "--runtime", "litert").stdout)["predictions"]
    assert [p["label"] for p in by_litert] == [p["label"] for p in by_tf]
    np.testing.assert_allclose([p["score"] for p in by_litert], [p["score"] for p in by_tf], rtol=0, atol=1e-4)



@pytest.mark.parametrize(("env", "flags", "message"), [
    ({"IMAGECLF_RUNTIME": "tflite"}, [], "--runtime (IMAGECLF_RUNTIME) 'tflite': choose from tf, litert"),
    ({}, ["--runtime", "onnx"], "argument --runtime: invalid choice: 'onnx'"),
    ({}, ["--runtime", "litert", "--litert_threads", "0"], "--litert_threads must be positive"),
])
def test_bad_runtime_settings_are_one_line(env, flags, message, tmp_path):
    import os

    done = subprocess.run([sys.executable, "-m", "service", "--graphs_dir", str(tmp_path), *flags], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, \
        done.stderr
