"""The frozen graph retrain.py writes: its tensors, embedded labels/metadata, and its two inputs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from imageclf import label_image_cli
from imageclf.graph_model import GraphModel
from imageclf.images import decode_image, read_image
from imageclf.preprocess import image_to_model_input
from tests.demo_data import draw_shape, make_dataset

from .conftest import REPO, run_in_process, run_tool


@pytest.fixture(scope="module", params=["head-only", "fine-tuned"])
def trained(request):
    """The contract holds whether only the new layer was trained or the base's top blocks too."""
    return request.getfixturevalue("demo_model" if request.param == "head-only" else "fine_tuned_demo_model")


@pytest.fixture(scope="module")
def graph(trained):
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(trained.graph.read_bytes())
    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    return g


@pytest.fixture(scope="module")
def model(trained):
    m = GraphModel(trained.graph)
    yield m
    m.close()


def test_tensors_have_the_promised_names_types_and_shapes(graph):
    placeholder = graph.get_tensor_by_name("Placeholder:0")
    assert placeholder.dtype == tf.float32 and placeholder.shape.as_list() == [None, 224, 224, 3]
    image_bytes = graph.get_tensor_by_name("image_bytes:0")
    assert image_bytes.dtype == tf.string and image_bytes.shape.as_list() == [None]
    final = graph.get_tensor_by_name("final_result:0")
    assert final.dtype == tf.float32 and final.shape.as_list() == [None, 3]
    assert final.op.type == "Softmax"
    assert graph.get_tensor_by_name("bottleneck:0").shape.as_list() == [None, 1280]
    assert not [op for op in graph.get_operations() if op.type.startswith("Variable")]


def test_labels_and_metadata_are_embedded(graph, trained):
    with tf.compat.v1.Session(graph=graph) as session:
        labels, metadata = session.run(["labels:0", "metadata:0"])
    assert [v.decode() for v in labels] == ["circle", "square", "triangle"]
    meta = json.loads(metadata)
    assert meta["input_size"] == [224, 224] and meta["labels"] == ["circle", "square", "triangle"]
    assert meta["output_tensor"] == "final_result:0" and meta["image_bytes_tensor"] == "image_bytes:0"
    assert meta["base_model"]["bottleneck_size"] == 1280 and "EfficientNet-Lite0" in meta["base_model"]["description"]
    if "fine_tune" in meta:  # says it was fine-tuned, and how
        assert meta["fine_tune"]["blocks"] == 1 and meta["fine_tune"]["epochs_run"] >= 1
        assert meta["base_model"]["fingerprint"].startswith("finetuned:")
    else:
        assert trained.graph.stem == "shapes" and not meta["base_model"]["fingerprint"].startswith("finetuned:")
    assert sum(c["train"] for c in meta["class_counts"].values()) == trained.split_counts["train"]
    assert set(meta["accuracy"]) == {"train", "validation", "test"} and meta["created"]
    low, high = meta["accuracy_ci95"]["test"]
    assert low <= meta["accuracy"]["test"] <= high and high - low > 0.01  # small N: a wide interval
    assert trained.labels_file.read_text() == "circle\nsquare\ntriangle\n"
    sidecar = json.loads(trained.sidecar.read_text())
    assert sidecar["labels"] == meta["labels"]
    matrix = np.array(sidecar["evaluation"]["confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == trained.split_counts["test"]


def test_demo_reaches_high_accuracy_on_new_pictures(model, trained, tmp_path):
    assert trained.evaluation["accuracy"] >= 0.9
    fresh = make_dataset(tmp_path, per_class=15, seed=12345)  # pictures it has never seen
    truth = [p.parent.name for p in fresh]
    predicted = [model.labels[i] for i in model.predict([read_image(p) for p in fresh]).argmax(axis=1)]
    assert np.mean([t == p for t, p in zip(truth, predicted, strict=True)]) >= 0.9


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **options)
    return out.getvalue()


@pytest.fixture(scope="module")
def structured_images() -> dict[str, bytes]:
    """Pictures with edges, noise and colour, at sizes that need real resampling, as JPEG and PNG."""
    jpeg = (REPO / "sample_images" / "square" / "square_001.jpg").read_bytes()
    return {
        "sample JPEG 160x120": jpeg,
        "PNG 333x250 (upscaled)": encoded(Image.open(io.BytesIO(jpeg)).resize((333, 250)), "PNG"),
        "star PNG 301x217": encoded(draw_shape("star", np.random.default_rng(5), (301, 217)), "PNG"),
        "JPEG 4:2:0 517x389": encoded(draw_shape("triangle", np.random.default_rng(6), (517, 389)), "JPEG",
                                      quality=80, subsampling=2),
    }


def test_both_inputs_give_the_same_features(graph, structured_images):
    """``image_bytes:0`` decodes and resizes in the graph as we do outside it with Pillow."""
    size = tuple(graph.get_tensor_by_name("Placeholder:0").shape[1:3])
    ours = {name: image_to_model_input(decode_image(data, size=size), size) for name, data in structured_images.items()}
    vectors = {}
    session = tf.compat.v1.Session(graph=graph)  # not as a context: that would make eager code build into graph
    try:
        for name, data in structured_images.items():
            from_pixels = session.run("bottleneck:0", {"Placeholder:0": ours[name][None]})[0]
            from_bytes = session.run("bottleneck:0", {"image_bytes:0": [data]})[0]
            difference = np.linalg.norm(from_pixels - from_bytes) / np.linalg.norm(from_pixels)
            assert difference < 1e-3, f"{name}: relative difference {difference:.2e}"
            vectors[name] = from_pixels
    finally:
        session.close()
    # Other pictures give clearly other features, so the agreement above is no accident.
    square = vectors["sample JPEG 160x120"]
    for other in ("star PNG 301x217", "JPEG 4:2:0 517x389"):
        assert np.linalg.norm(vectors[other] - square) / np.linalg.norm(square) > 0.05


def test_both_inputs_give_the_same_probabilities(model, structured_images):
    for data in structured_images.values():
        from_pixels = model.predict([decode_image(data, size=model.input_size)])[0]
        from_bytes = model.predict_encoded([data])[0]
        np.testing.assert_allclose(from_pixels, from_bytes, atol=1e-4)
        assert abs(from_pixels.sum() - 1) < 1e-5


def test_image_bytes_takes_a_batch(model):
    files = sorted((REPO / "sample_images").glob("*/*_00[0-2].jpg"))
    batch = model.predict_encoded([p.read_bytes() for p in files])
    assert batch.shape == (len(files), 3)
    np.testing.assert_allclose(batch, model.predict([read_image(p) for p in files]), atol=1e-4)


def test_label_image_prints_what_the_graph_computes(model, trained):
    image = REPO / "sample_images" / "circle" / "circle_004.jpg"
    expected = model.predict_encoded([image.read_bytes()])[0]
    result = run_in_process("label_image.py", label_image_cli.main, "--graph", str(trained.graph),
                            "--image", str(image), "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["predictions"][0]["label"] == "circle"
    for row in answer["predictions"]:
        assert row["score"] == pytest.approx(float(expected[model.labels.index(row["label"])]), abs=1e-4)
    # The plain text, as a user runs it: its own process.
    plain = run_tool("label_image.py", "--graph", str(trained.graph), "--image", str(image), "--top_k", "2")
    lines = plain.stdout.splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "circle"
    assert float(lines[0].split()[-1]) == pytest.approx(float(expected.max()), abs=1e-4)


def test_saved_model_serves_the_same_scores(trained):
    loaded = tf.saved_model.load(str(trained.saved_model))
    image = (REPO / "sample_images" / "triangle" / "triangle_002.jpg").read_bytes()
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([image]))
    model = GraphModel(trained.graph)
    np.testing.assert_allclose(out["scores"].numpy()[0], model.predict_encoded([image])[0], atol=1e-6)
    assert [c.decode() for c in out["classes"].numpy()[0]] == ["circle", "square", "triangle"]
    assert trained.saved_model.parent.name == "saved_model" and trained.saved_model.name.isdigit()


def test_without_the_in_graph_decoder_the_same_graph_gives_the_same_scores(model, trained, structured_images):
    """What the service loads: the decoder below Placeholder:0 left out, the answers unchanged."""
    served = GraphModel(trained.graph, decode_in_graph=False)
    try:
        ops = {op.type for op in served.graph.get_operations()}
        assert not ops & {"DecodeJpeg", "DecodeImage", "DecodePng", "While", "StatelessWhile", "TensorListReserve"}
        assert len(served.graph.as_graph_def().library.function) == 0
        assert served.input.op.type == "Placeholder" and served.bytes_input is None
        assert served.bytes_input_name == model.bytes_input_name == "image_bytes:0"
        assert (served.labels, served.input_size) == (model.labels, model.input_size)
        pixels = [decode_image(data, size=model.input_size) for data in structured_images.values()]
        np.testing.assert_allclose(served.predict(pixels), model.predict(pixels), rtol=0, atol=1e-6)
    finally:
        served.close()
