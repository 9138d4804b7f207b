"""Every kind of --tfhub_module: local SavedModel, TF Hub URL (cached), TF1 Hub module, frozen graph."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from imageclf import retrain_cli
from imageclf.bases import FrozenGraphSpec, classifier_features, load_base
from imageclf.bottlenecks import feature_function
from imageclf.cli_common import run
from imageclf.errors import UserError
from imageclf.graph_model import GraphModel
from imageclf.images import read_image
from tests.demo_data import make_dataset

from .conftest import FROZEN_BASE, TinyFeatures, needs_shared, run_in_process, write_frozen_base


def features_of(base, images: np.ndarray) -> np.ndarray:
    return feature_function(base)(tf.constant(images)).numpy()


def test_local_saved_model_dir(tiny_module):
    base = load_base(str(tiny_module))
    assert base.input_size == (32, 32) and base.bottleneck_size == 19
    images = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    expected = TinyFeatures()(tf.constant(images)).numpy()
    np.testing.assert_allclose(features_of(base, images), expected, atol=1e-5)


@pytest.fixture()
def module_server(tiny_module, tmp_path):
    """A local HTTP server publishing the module as a .tar.gz, as TF Hub hosts serve them."""
    root = tmp_path / "www"
    root.mkdir()
    with tarfile.open(root / "tiny.tar.gz", "w:gz") as tar:
        for path in Path(tiny_module).rglob("*"):
            tar.add(path, arcname=str(path.relative_to(tiny_module)))
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/tiny.tar.gz", requests
    server.shutdown()


def test_hub_url_is_downloaded_once_into_tfhub_cache_dir(module_server, tmp_path, monkeypatch):
    url, requests = module_server
    cache = tmp_path / "hub_cache"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    first = load_base(url)
    assert first.bottleneck_size == 19 and len(requests) == 1
    assert list(cache.rglob("saved_model.pb"))
    second = load_base(url)
    assert len(requests) == 1 and second.fingerprint == first.fingerprint


def test_unreachable_hub_handle_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="cannot fetch"):
        load_base("http://127.0.0.1:9/nothing-listens-here.tar.gz")


def test_tf1_hub_module(tmp_path):
    """A TF1-format module (graph + 'default' signature) is used through that signature."""
    path = tmp_path / "tf1_module"
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [None, 24, 24, 3], name="images")
        scale = tf.compat.v1.get_variable("scale", initializer=tf.constant([1.0, 2.0, 3.0]))
        features = tf.reduce_mean(images, axis=[1, 2]) * scale
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(str(path))
            signature = tf.compat.v1.saved_model.predict_signature_def({"images": images}, {"default": features})
            builder.add_meta_graph_and_variables(session, [], signature_def_map={"default": signature})
            builder.save()
    base = load_base(str(path))
    assert base.input_size == (24, 24) and base.bottleneck_size == 3
    x = np.full((2, 24, 24, 3), 0.5, np.float32)
    np.testing.assert_allclose(features_of(base, x), [[0.5, 1.0, 1.5]] * 2, atol=1e-6)


def test_folder_without_saved_model(tmp_path):
    with pytest.raises(UserError, match="no saved_model.pb"):
        load_base(str(tmp_path))


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        load_base(str(tmp_path / "nope.pb"))


# -- Frozen GraphDef bases: on one made by conftest.py, then on the real MobileNet in ../shared ----


def graph_features(graph: Path, images: np.ndarray, mean: float = 127.5, std: float = 127.5,
                   tensor: str = "MobilenetV1/Predictions/Reshape:0") -> np.ndarray:
    """The original graph's ``tensor``, one (p - mean) / std image at a time, as upstream fed it."""
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(graph.read_bytes())
    with tf.Graph().as_default() as g:
        tf.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=g) as session:
            return np.concatenate([session.run(tensor, {"input:0": (one[None] * 255 - mean) / std}).reshape(1, -1)
                                   for one in images])


def test_made_frozen_graph_base_needs_its_tensor_names_and_scaling(frozen_base):
    with pytest.raises(UserError, match="--base_input_tensor, --base_bottleneck_tensor, --base_input_mean"):
        load_base(str(frozen_base.graph))
    with pytest.raises(UserError, match="also give --base_input_mean, --base_input_std"):
        load_base(str(frozen_base.graph), FrozenGraphSpec(frozen_base.input_tensor, frozen_base.bottleneck_tensor))
    with pytest.raises(UserError, match="does not match"):
        load_base(str(frozen_base.graph), frozen_base.spec(input_size=(64, 64)))


@pytest.mark.parametrize("batch", [None, 1], ids=["any-batch", "batch-of-one"])
def test_made_frozen_graph_base_is_batched_and_scaled(frozen_base, tmp_path, batch):
    """Official MobileNet frozen graphs take one image ([1, H, W, 3]); the base still runs batches."""
    made = frozen_base if batch is None else write_frozen_base(tmp_path / "one", batch=1)
    base = load_base(str(made.graph), dataclasses.replace(made.spec(), exact_bottleneck=True))
    assert base.input_size == (48, 48) and base.bottleneck_size == 16
    images = np.random.default_rng(1).random((3, 48, 48, 3), dtype=np.float32)
    batched = features_of(base, images)
    np.testing.assert_allclose(batched, graph_features(made.graph, images), atol=1e-4)
    # The scaling matters: the same images fed in [0, 1] give other features.
    assert not np.allclose(batched, graph_features(made.graph, images, mean=0.0, std=255.0), atol=1e-2)


def test_frozen_base_trains_on_the_features_under_its_class_logits(frozen_base):
    """The Poets "bottleneck" is the ImageNet logits; the pooled features under them are used."""
    base = load_base(str(frozen_base.graph), frozen_base.spec())
    assert base.bottleneck_size == 12 and "features MobilenetV1/Logits/AvgPool:0" in base.description
    images = np.random.default_rng(2).random((3, 48, 48, 3), dtype=np.float32)
    np.testing.assert_allclose(features_of(base, images),
                               graph_features(frozen_base.graph, images, tensor="MobilenetV1/Logits/AvgPool:0"),
                               atol=1e-5)
    # Naming the features directly is the same base: same vectors, same cache.
    direct = load_base(str(frozen_base.graph),
                       dataclasses.replace(frozen_base.spec(), bottleneck_tensor="MobilenetV1/Logits/AvgPool:0"))
    assert direct.fingerprint == base.fingerprint
    exact = load_base(str(frozen_base.graph), dataclasses.replace(frozen_base.spec(), exact_bottleneck=True))
    assert exact.bottleneck_size == 16 and exact.fingerprint != base.fingerprint


def test_tensors_that_are_not_class_logits_are_used_as_named(frozen_base):
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(frozen_base.graph.read_bytes())
    with tf.Graph().as_default() as g:
        tf.import_graph_def(graph_def, name="")
        # A convolution's activations and the pooled features themselves are features already.
        assert classifier_features(g.get_tensor_by_name("MobilenetV1/Conv2d_0/Relu6:0")) is None
        assert classifier_features(g.get_tensor_by_name("MobilenetV1/Logits/AvgPool:0")) is None
        assert classifier_features(g.get_tensor_by_name("MobilenetV1/Predictions/Softmax:0")) is None
        logits = g.get_tensor_by_name("MobilenetV1/Predictions/Reshape:0")
        assert classifier_features(logits).name == "MobilenetV1/Logits/AvgPool:0"


def test_retrain_on_made_frozen_graph_base_cli(frozen_base, tmp_path, capsys):
    make_dataset(tmp_path / "data", per_class=6)
    status = run("retrain.py", retrain_cli.main, [
        "--image_dir", str(tmp_path / "data"), "--quiet", *frozen_base.flags(), "--how_many_training_steps", "20",
        "--output_graph", str(tmp_path / "out.pb"), "--bottleneck_dir", str(tmp_path / "bn")])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "Base model: frozen graph frozen_graph.pb, features MobilenetV1/Logits/AvgPool:0 (they feed its " \
        "classifier MobilenetV1/Predictions/Reshape:0) (48x48, 12 features; bottlenecks by LiteRT)" in out
    model = GraphModel(tmp_path / "out.pb")
    try:
        assert model.input_size == (48, 48) and model.labels == ["circle", "square", "triangle"]
        assert model.predict([read_image(tmp_path / "data" / "circle" / "circle_000.jpg")]).shape == (1, 3)
    finally:
        model.close()


@needs_shared
def test_frozen_graph_base_needs_its_tensor_names_and_scaling():
    with pytest.raises(UserError, match="--base_input_tensor, --base_bottleneck_tensor, --base_input_mean"):
        load_base(str(FROZEN_BASE / "frozen_graph.pb"))


@needs_shared
def test_frozen_graph_base_is_batched_and_scaled(tmp_path):
    spec = FrozenGraphSpec("input:0", "MobilenetV1/Predictions/Reshape:0", 127.5, 127.5, exact_bottleneck=True)
    base = load_base(str(FROZEN_BASE / "frozen_graph.pb"), spec)
    assert base.input_size == (224, 224) and base.bottleneck_size == 1001
    images = np.random.default_rng(1).random((3, 224, 224, 3), dtype=np.float32)
    batched = features_of(base, images)
    # The original graph takes one (x - 127.5) / 127.5 image at a time: compare with it directly.
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString((FROZEN_BASE / "frozen_graph.pb").read_bytes())
    with tf.Graph().as_default() as g:
        tf.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=g) as session:
            for one, got in zip(images, batched, strict=True):
                want = session.run("MobilenetV1/Predictions/Reshape:0", {"input:0": (one[None] * 255 - 127.5) / 127.5})
                np.testing.assert_allclose(got, want[0], atol=1e-4)


@needs_shared
def test_retrain_on_frozen_graph_base_cli(tmp_path):
    make_dataset(tmp_path / "data", per_class=8)
    result = run_in_process("retrain.py", retrain_cli.main, "--image_dir", str(tmp_path / "data"), "--quiet",
                            "--tfhub_module", str(FROZEN_BASE / "frozen_graph.pb"),
                            "--base_input_tensor", "input:0",
                            "--base_bottleneck_tensor", "MobilenetV1/Predictions/Reshape:0",
                            "--base_input_mean", "127.5", "--base_input_std", "127.5",
                            "--how_many_training_steps", "100",
                            "--output_graph", str(tmp_path / "out.pb"), "--bottleneck_dir", str(tmp_path / "bn"))
    assert result.returncode == 0, result.stderr
    assert "features MobilenetV1/Logits/AvgPool_1a/AvgPool:0" in result.stdout
    assert "224x224, 256 features" in result.stdout
