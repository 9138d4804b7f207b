"""Shared fixtures: real TensorFlow graphs, made once per session on small generated data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

from imageclf.demo_data import make_dataset  # noqa: E402
from imageclf.retrain import RetrainOptions, retrain  # noqa: E402
from imageclf.training import TrainConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
POETS = SHARED / "graphs" / "poets_mobilenet_v1_025_128_defects"
FROZEN_BASE = SHARED / "base" / "mobilenet_v1_025_224_frozen"

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is not beside the repo")


def run_tool(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run retrain.py or label_image.py as a user would."""
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=600)


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
    return RetrainOptions(image_dir=str(image_dir), output_graph=str(out / "model.pb"),
                          bottleneck_dir=str(out / "bottlenecks"), training=training, **overrides)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_dataset(root, per_class=20)
    return root


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """Our real product: the built-in MobileNetV2 retrained on the sample_images demo set."""
    out = tmp_path_factory.mktemp("demo_model")
    opts = RetrainOptions(image_dir=str(REPO / "sample_images"), output_graph=str(out / "shapes.pb"),
                          bottleneck_dir=str(out / "bottlenecks"),
                          saved_model_dir=str(out / "saved_model"),
                          training=TrainConfig(steps=1000, eval_step_interval=500, progress=False))
    return retrain(opts, log=lambda line: None)


@pytest.fixture()
def copy_tree(tmp_path):
    def copy(src: Path, name: str = "data") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst
    return copy
