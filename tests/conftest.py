"""Shared fixtures: real TensorFlow graphs, made once per session on small generated data."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

from imageclf.bases import FrozenGraphSpec  # noqa: E402
from imageclf.fine_tune import FineTuneConfig  # noqa: E402
from imageclf.retrain import RetrainOptions, retrain  # noqa: E402
from imageclf.training import TrainConfig  # noqa: E402
from tests.demo_data import draw_shape, make_dataset  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
POETS = SHARED / "graphs" / "poets_mobilenet_v1_025_128_defects"
FROZEN_BASE = SHARED / "base" / "mobilenet_v1_025_224_frozen"

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is not beside the repo")


def run_tool(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run retrain.py or label_image.py as a user would."""
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=600)


def run_in_process(script: str, main, *args: str) -> subprocess.CompletedProcess:
    """A command line's ``main`` run in this process, as ``script`` would run it (no new TensorFlow start-up)."""
    import contextlib
    import io

    from imageclf.cli_common import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = run(script, main, list(args))
        except SystemExit as e:  # argparse's own errors end the process, as they do for a user
            status = e.code
    return subprocess.CompletedProcess([script, *args], status, out.getvalue(), err.getvalue())


class TinyFeatures(tf.Module):
    """A small fixed-weight convolutional feature extractor (fast stand-in for a real base)."""

    def __init__(self):
        super().__init__()
        self.kernel = tf.Variable(tf.random.stateless_normal([3, 3, 3, 8], seed=[1, 2]))

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
    def __call__(self, images):
        maps = tf.nn.relu(tf.nn.conv2d(images, self.kernel, 2, "SAME"))
        return tf.concat([tf.reduce_mean(maps, [1, 2]), tf.reduce_max(maps, [1, 2]),
                          tf.reduce_mean(images, [1, 2])], axis=1)


@pytest.fixture(scope="session")
def tiny_module(tmp_path_factory) -> Path:
    """A TF2 SavedModel image feature-vector module (32x32 -> 19 features) in a local folder."""
    path = tmp_path_factory.mktemp("modules") / "tiny_features"
    tf.saved_model.save(TinyFeatures(), str(path))
    return path


def quick_options(image_dir: Path, out: Path, **overrides) -> RetrainOptions:
    training = overrides.pop("training", TrainConfig(steps=300, eval_step_interval=100, progress=False))
    overrides.setdefault("tfhub_module", "builtin")  # the fastest real base; tests choose another by name
    return RetrainOptions(image_dir=str(image_dir), output_graph=str(out / "model.pb"),
                          bottleneck_dir=str(out / "bottlenecks"), training=training, **overrides)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 60.0, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` at the deadline.

    Every wait in the tests has a deadline: a poller or server thread that died must fail its
    test with a message, not hang the suite.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(interval)


def tiny_graphs_dir(image_dir: Path, tiny_module: Path, out: Path, name: str) -> Path:
    """A graphs folder holding ``<name>.pb``, retrained quickly on ``image_dir`` with the tiny base."""
    opts = quick_options(image_dir, out, tfhub_module=str(tiny_module),
                         training=TrainConfig(steps=100, eval_step_interval=100, progress=False))
    opts.output_graph = str(out / "graphs" / f"{name}.pb")
    retrain(opts, log=lambda line: None)
    return out / "graphs"


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_dataset(root, per_class=20)
    return root


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """Our real product: the default base (EfficientNet-Lite0) retrained on the sample_images demo set."""
    out = tmp_path_factory.mktemp("demo_model")
    opts = RetrainOptions(image_dir=str(REPO / "sample_images"), output_graph=str(out / "shapes.pb"),
                          bottleneck_dir=str(out / "bottlenecks"),
                          saved_model_dir=str(out / "saved_model"),
                          training=TrainConfig(steps=1000, eval_step_interval=500, progress=False))
    return retrain(opts, log=lambda line: None)


@pytest.fixture(scope="session")
def fine_tuned_demo_model(tmp_path_factory):
    """The same, with the base's top block fine-tuned too (kept short: one epoch)."""
    out = tmp_path_factory.mktemp("fine_tuned_model")
    opts = RetrainOptions(image_dir=str(REPO / "sample_images"), output_graph=str(out / "tuned.pb"),
                          bottleneck_dir=str(out / "bottlenecks"), saved_model_dir=str(out / "saved_model"),
                          training=TrainConfig(steps=1000, eval_step_interval=500, progress=False),
                          fine_tune=FineTuneConfig(blocks=1, max_epochs=1, progress=False))
    return retrain(opts, log=lambda line: None)


@pytest.fixture()
def copy_tree(tmp_path):
    def copy(src: Path, name: str = "data") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst
    return copy


# -- Graphs like the ones users bring: made here, so a plain clone tests them without ../shared --


def reference_input(image: Path, size: tuple[int, int], mean: float = 127.5, std: float = 127.5) -> np.ndarray:
    """What the older retrain scripts' label_image fed a graph: Pillow RGB, bilinear resize, (p - mean) / std.

    Written with Pillow and NumPy only, so tests can check our preprocessing against it.
    Returns float32 ``[1, height, width, 3]``.
    """
    with Image.open(image) as img:
        resized = img.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return ((np.asarray(resized, np.float32) - mean) / std)[None]


def _mobilenet_like_features(images: tf.Tensor, features: int, seed: int) -> tf.Tensor:
    """A tiny stand-in for MobileNet v1, with its op names where callers look for them."""
    rng = np.random.default_rng(seed)
    with tf.name_scope("MobilenetV1/Conv2d_0"):
        kernel = tf.constant(rng.normal(0, 0.4, (3, 3, 3, 12)).astype(np.float32), name="weights")
        bias = tf.constant(rng.normal(0, 0.2, 12).astype(np.float32), name="biases")
        maps = tf.nn.relu6(tf.nn.conv2d(images, kernel, 2, "SAME") + bias, name="Relu6")
    with tf.name_scope("MobilenetV1/Logits"):
        pooled = tf.reduce_mean(maps, [1, 2], keepdims=True, name="AvgPool")
        weights = tf.constant(rng.normal(0, 1.0, (1, 1, 12, features)).astype(np.float32), name="weights")
        logits = tf.nn.conv2d(pooled, weights, 1, "VALID", name="Conv2d_1c_1x1")
        squeezed = tf.squeeze(logits, [1, 2], name="SpatialSqueeze")
    with tf.name_scope("MobilenetV1/Predictions"):
        # As in the real graph: reshape to [-1, D] (the bottleneck), then softmax.
        bottleneck = tf.reshape(squeezed, [-1, features], name="Reshape")
        tf.nn.softmax(bottleneck, name="Softmax")
    return bottleneck


@dataclass(frozen=True)
class FrozenBase:
    """A frozen TF1-style base graph (``graph``) and its class names (``labels``), as
    mobilenet_v1_*/frozen_graph.pb and labels.txt come: input ``input:0`` float32
    ``[batch, H, W, 3]`` fed (p - 127.5) / 127.5, bottleneck ``MobilenetV1/Predictions/Reshape:0``."""

    graph: Path
    labels: Path
    size: tuple[int, int] | None  # None: any input size (then give --base_input_size)
    features: int
    input_tensor: str = "input:0"
    bottleneck_tensor: str = "MobilenetV1/Predictions/Reshape:0"
    input_mean: float = 127.5
    input_std: float = 127.5

    def spec(self, input_size: tuple[int, int] | None = None) -> FrozenGraphSpec:
        return FrozenGraphSpec(self.input_tensor, self.bottleneck_tensor, self.input_mean, self.input_std,
                               input_size)

    def flags(self) -> list[str]:
        """retrain.py flags that use this graph as the base."""
        return ["--tfhub_module", str(self.graph), "--base_input_tensor", self.input_tensor,
                "--base_bottleneck_tensor", self.bottleneck_tensor,
                "--base_input_mean", str(self.input_mean), "--base_input_std", str(self.input_std)]


def write_frozen_base(folder: Path, size: tuple[int, int] | None = (48, 48), batch: int | None = None,
                      features: int = 16, seed: int = 0) -> FrozenBase:
    """Write a frozen base into ``folder``; ``batch=1`` makes it take one image at a time, as
    the official MobileNet v1 frozen graphs do, and ``size=None`` any image size."""
    folder.mkdir(parents=True, exist_ok=True)
    height, width = size or (None, None)
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [batch, height, width, 3], name="input")
        _mobilenet_like_features(images, features, seed)
    path = folder / "frozen_graph.pb"
    path.write_bytes(graph.as_graph_def().SerializeToString())
    labels = folder / "labels.txt"
    labels.write_text("background\n" + "".join(f"class {i}\n" for i in range(1, features)))
    return FrozenBase(graph=path, labels=labels, size=size, features=features)


@pytest.fixture(scope="session")
def frozen_base(tmp_path_factory) -> FrozenBase:
    """A small frozen MobileNet-like base (48x48, 16 features); see FrozenBase and write_frozen_base."""
    return write_frozen_base(tmp_path_factory.mktemp("frozen_base"))


@dataclass(frozen=True)
class PoetsGraph:
    """A folder laid out like TensorFlow-for-Poets retrain.py output; see poets_like_graph."""

    folder: Path
    graph: Path            # retrained_graph.pb
    labels_file: Path      # retrained_labels.txt
    labels: list[str]
    sample_images: list[Path]
    input_tensor: str = "input:0"
    output_tensor: str = "final_result:0"
    input_size: tuple[int, int] = (128, 128)
    input_mean: float = 127.5
    input_std: float = 127.5

    def flags(self) -> list[str]:
        """label_image.py flags for this graph (without scaling: the user must give that)."""
        return ["--graph", str(self.graph), "--labels", str(self.labels_file),
                "--input_layer", self.input_tensor.split(":")[0], "--output_layer", self.output_tensor.split(":")[0]]

    def settings_json(self, labels_file: str = "retrained_labels.txt") -> dict:
        """The ``<graph>.json`` sidecar that lets label_image and the service use it without flags."""
        return {"input_tensor": self.input_tensor, "output_tensor": self.output_tensor,
                "input_mean": self.input_mean, "input_std": self.input_std, "labels_file": labels_file}


POETS_LABELS = ["part scratch mark", "part slot damage", "part wrinkle", "part ok back", "part ok front"]
# Sample image -> (shape drawn, size, the logits the fitted final layer gives it): two clear
# answers and one with a close runner-up, as the real Poets samples have.
_POETS_SAMPLES = {
    "part(FrontSide)-OK-(6).jpg": ("circle", (240, 180), [0.0, 0.0, 0.0, 0.0, 4.0]),
    "scratch1.png": ("star", (200, 200), [-2.0, 1.5, 1.0, -2.0, -2.0]),
    "scratch2.png": ("square", (150, 210), [0.0, 0.0, 3.5, 0.0, 0.0]),
}


@pytest.fixture(scope="session")
def poets_like_graph(tmp_path_factory) -> PoetsGraph:
    """A graph from the older TensorFlow-for-Poets retrain.py, made here. The folder holds:

    - ``retrained_graph.pb``: frozen GraphDef, every weight a constant. Input ``input:0`` float32
      with a FIXED batch of 1, ``[1, 128, 128, 3]``, pixels fed as (p - 127.5) / 127.5; a small
      MobileNet-like base (bottleneck ``MobilenetV1/Predictions/Reshape:0``), then
      ``input_1/BottleneckInputPlaceholder`` and ``final_training_ops/Wx_plus_b``; output
      ``final_result:0``, softmax over the 5 labels.
    - ``retrained_labels.txt``: the labels, one per line, in score order.
    - ``sample_images/``: three structured pictures with clear answers (about, at 127.5/127.5):
      ``part(FrontSide)-OK-(6).jpg`` -> part ok front 0.93; ``scratch1.png`` -> part slot damage
      0.59, then part wrinkle 0.36; ``scratch2.png`` -> part wrinkle 0.89. Tests should compute
      exact expectations with ``reference_input`` and the graph rather than copy these numbers.

    Nothing tells the graph's scaling except these notes, as with real Poets graphs: callers
    pass --input_mean/--input_std or write ``settings_json()`` to ``<graph stem>.json``.
    The fixture is shared by the whole session: copy files out before changing anything.
    """
    folder = tmp_path_factory.mktemp("poets_like")
    samples = folder / "sample_images"
    samples.mkdir()
    targets = []
    for i, (name, (kind, size, logits)) in enumerate(_POETS_SAMPLES.items()):
        draw_shape(kind, np.random.default_rng([7, i]), size).save(samples / name, quality=90)
        targets.append(logits)
    sample_paths = [samples / name for name in _POETS_SAMPLES]
    graph_def = _poets_graph_def(sample_paths, np.array(targets, np.float32))
    (folder / "retrained_graph.pb").write_bytes(graph_def.SerializeToString())
    (folder / "retrained_labels.txt").write_text("".join(f"{label}\n" for label in POETS_LABELS))
    return PoetsGraph(folder=folder, graph=folder / "retrained_graph.pb",
                      labels_file=folder / "retrained_labels.txt", labels=list(POETS_LABELS),
                      sample_images=sample_paths)


def _poets_graph_def(samples: list[Path], target_logits: np.ndarray) -> tf.compat.v1.GraphDef:
    """Base graph, then a final layer fitted (least squares) so each sample gets its target logits."""
    features = 16
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [1, 128, 128, 3], name="input")
        bottleneck = _mobilenet_like_features(images, features, seed=3)
        with tf.compat.v1.Session(graph=graph) as session:
            vectors = np.concatenate([session.run(bottleneck, {images: reference_input(p, (128, 128))})
                                      for p in samples])
        weights, biases = _fit_layer(vectors, target_logits)
        with tf.name_scope("input_1"):
            fed = tf.compat.v1.placeholder_with_default(bottleneck, [None, features],
                                                        name="BottleneckInputPlaceholder")
        with tf.name_scope("final_training_ops/Wx_plus_b"):
            logits = tf.matmul(fed, tf.constant(weights)) + tf.constant(biases)
        tf.nn.softmax(logits, name="final_result")
    return graph.as_graph_def()


def _fit_layer(vectors: np.ndarray, target_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    centred = vectors - vectors.mean(axis=0)
    weights, *_ = np.linalg.lstsq(centred, target_logits - target_logits.mean(axis=0), rcond=None)
    biases = target_logits.mean(axis=0) - vectors.mean(axis=0) @ weights
    return weights.astype(np.float32), biases.astype(np.float32)
