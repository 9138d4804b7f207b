"""label_image.py on our graphs and on graphs from the older retrain scripts."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from imageclf import label_image_cli
from imageclf.graph_model import GraphModel, GraphSettings
from imageclf.images import read_image

from .conftest import POETS, REPO, needs_shared, reference_input, run_in_process, wait_until
from .service_helpers import Server

POETS_FLAGS = ["--graph", str(POETS / "retrained_graph.pb"), "--labels", str(POETS / "retrained_labels.txt"),
               "--input_layer", "input", "--output_layer", "final_result"]

# Reference from ../shared/README.md (Pillow bilinear resize, mean = std = 127.5). Our resize is
# TensorFlow's antialiased bilinear, so scores agree to about 0.02, and the order exactly.
REFERENCE = [
    ("61326(FrontSide)-OK-(6).jpg", "61326 ok front", 1.000),
    ("scratch1.png", "61326 slot damage", 0.605),
    ("scratch2.png", "61326 wrinkle", 0.977),
]


def top(result) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["predictions"]


def label_image_run(*args: str) -> subprocess.CompletedProcess:
    """label_image.py's main in this process (TensorFlow is loaded once for the module, not per run)."""
    return run_in_process("label_image.py", label_image_cli.main, *args)


def poets_top(mean: str, std: str, image: str = "scratch2.png") -> list[dict]:
    """label_image's ranked answer for a Poets sample image with the given scaling."""
    return _poets_top(mean, std, image)


@functools.cache
def _poets_top(mean: str, std: str, image: str) -> list[dict]:
    # One run per arguments: three tests compare against the same 127.5/127.5 answer for scratch2.png.
    return top(label_image_run(*POETS_FLAGS, "--input_mean", mean, "--input_std", std,
                               "--image", str(POETS / "sample_images" / image), "--json"))


@needs_shared
@pytest.mark.parametrize("image, label, score", REFERENCE)
def test_poets_graph_matches_reference(image, label, score):
    best = poets_top("127.5", "127.5", image)[0]
    assert best["label"] == label
    assert best["score"] == pytest.approx(score, abs=0.02)


@needs_shared
def test_poets_graph_with_upstream_128_scaling_agrees():
    a, b = poets_top("128", "128"), poets_top("127.5", "127.5")
    assert a[0]["label"] == b[0]["label"] and a[0]["score"] == pytest.approx(b[0]["score"], abs=1e-2)


@needs_shared
def test_input_mean_zero_is_a_real_value():
    zero, right = poets_top("0", "127.5"), poets_top("127.5", "127.5")
    assert zero[0]["score"] != pytest.approx(right[0]["score"], abs=1e-3)


@needs_shared
def test_foreign_graph_without_scaling_is_refused_not_guessed():
    result = label_image_run(*POETS_FLAGS, "--image", str(POETS / "sample_images" / "scratch2.png"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "give --input_mean and --input_std" in result.stderr


@needs_shared
def test_sidecar_settings_make_a_foreign_graph_need_no_flags(tmp_path):
    graph = tmp_path / "defects.pb"
    shutil.copy(POETS / "retrained_graph.pb", graph)
    shutil.copy(POETS / "retrained_labels.txt", tmp_path / "retrained_labels.txt")
    (tmp_path / "defects.json").write_text(json.dumps({
        "input_tensor": "input:0", "output_tensor": "final_result:0", "input_mean": 127.5, "input_std": 127.5,
        "labels_file": "retrained_labels.txt"}))
    best = top(label_image_run("--graph", str(graph), "--json",
                               "--image", str(POETS / "sample_images" / "scratch2.png")))[0]
    assert best["label"] == "61326 wrinkle"


# -- The same behaviours on a Poets-like graph made by conftest.py (no ../shared needed) ------


def label_image(*args: str) -> tuple[int, str, str]:
    """label_image.py in this process (TensorFlow is already loaded): (status, stdout, stderr)."""
    result = run_in_process("label_image.py", label_image_cli.main, *args)
    return result.returncode, result.stdout, result.stderr


def ranked(poets, image, mean="127.5", std="127.5") -> list[dict]:
    status, out, err = label_image(*poets.flags(), "--input_mean", mean, "--input_std", std,
                                   "--image", str(image), "--json")
    assert status == 0, err
    return json.loads(out)["predictions"]


def expected_scores(poets, image, mean=127.5, std=127.5) -> np.ndarray:
    """The graph's answer for pixels prepared with Pillow and NumPy, not with our code."""
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(poets.graph.read_bytes())
    with tf.Graph().as_default() as graph:
        tf.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            return session.run(poets.output_tensor,
                               {poets.input_tensor: reference_input(image, poets.input_size, mean, std)})[0]


def test_poets_like_graph_matches_an_independent_reference(poets_like_graph):
    for image in poets_like_graph.sample_images:
        want = expected_scores(poets_like_graph, image)
        got = ranked(poets_like_graph, image)
        # Pillow's bilinear and TensorFlow's antialiased bilinear differ slightly: scores agree to
        # 0.02, so the winner (clear in every sample) must be the same.
        assert got[0]["label"] == poets_like_graph.labels[int(want.argmax())]
        assert len(got) == 5 and [row["score"] for row in got] == sorted((row["score"] for row in got), reverse=True)
        for row in got:
            assert row["score"] == pytest.approx(float(want[poets_like_graph.labels.index(row["label"])]), abs=0.02)
    # The samples were made to have clear answers, one with a close runner-up.
    tops = [ranked(poets_like_graph, image)[:2] for image in poets_like_graph.sample_images]
    assert [top[0]["label"] for top in tops] == ["part ok front", "part slot damage", "part wrinkle"]
    assert tops[1][1]["label"] == "part wrinkle" and tops[1][1]["score"] > 0.3


def test_poets_like_graph_plain_text_output(poets_like_graph):
    image = poets_like_graph.sample_images[0]  # the JPEG with parentheses in its name
    status, out, err = label_image(*poets_like_graph.flags(), "--input_mean", "127.5", "--input_std", "127.5",
                                   "--image", str(image), "--top_k", "2")
    assert status == 0, err
    want = np.sort(expected_scores(poets_like_graph, image))[::-1]
    lines = [line.rsplit(maxsplit=1) for line in out.splitlines()]
    assert len(lines) == 2 and lines[0][0].strip() == "part ok front"
    assert [float(score) for _, score in lines] == pytest.approx(want[:2].tolist(), abs=0.02)


def test_poets_like_graph_with_upstream_128_scaling_agrees(poets_like_graph):
    for image in poets_like_graph.sample_images:
        a, b = ranked(poets_like_graph, image, "128", "128"), ranked(poets_like_graph, image)
        assert a[0]["label"] == b[0]["label"] and a[0]["score"] == pytest.approx(b[0]["score"], abs=1e-2)


def test_input_mean_zero_is_a_real_value_on_poets_like_graph(poets_like_graph):
    image = poets_like_graph.sample_images[2]
    zero, right = ranked(poets_like_graph, image, "0", "127.5"), ranked(poets_like_graph, image)
    want_zero = expected_scores(poets_like_graph, image, mean=0.0, std=127.5)
    assert zero[0]["label"] == poets_like_graph.labels[int(want_zero.argmax())] != right[0]["label"]
    assert zero[0]["score"] == pytest.approx(float(want_zero.max()), abs=0.02)


def test_poets_like_graph_without_scaling_is_refused_not_guessed(poets_like_graph):
    status, out, err = label_image(*poets_like_graph.flags(), "--image", str(poets_like_graph.sample_images[0]))
    assert status == 2 and out == "" and "Traceback" not in err
    assert "give --input_mean and --input_std" in err


def test_sidecar_settings_make_a_poets_like_graph_need_no_flags(poets_like_graph, tmp_path):
    graph = tmp_path / "defects.pb"
    shutil.copy(poets_like_graph.graph, graph)
    shutil.copy(poets_like_graph.labels_file, tmp_path / "retrained_labels.txt")
    (tmp_path / "defects.json").write_text(json.dumps(poets_like_graph.settings_json()))
    image = poets_like_graph.sample_images[2]
    status, out, err = label_image("--graph", str(graph), "--json", "--image", str(image))
    assert status == 0, err
    best = json.loads(out)["predictions"][0]
    assert best["label"] == "part wrinkle"
    assert best["score"] == pytest.approx(float(expected_scores(poets_like_graph, image).max()), abs=0.02)


def test_batch_of_one_graph_is_run_one_image_at_a_time(poets_like_graph):
    model = GraphModel(poets_like_graph.graph, GraphSettings(
        input_tensor="input", input_mean=127.5, input_std=127.5, labels_file=str(poets_like_graph.labels_file)))
    try:
        assert not model.batchable and model.input_size == (128, 128)
        pixels = [read_image(p) for p in poets_like_graph.sample_images]
        together = model.predict(pixels)
        assert together.shape == (3, len(poets_like_graph.labels))
        for one, row in zip(pixels, together, strict=True):
            np.testing.assert_allclose(model.predict([one])[0], row, atol=1e-6)
        assert len({int(row.argmax()) for row in together}) == 3
    finally:
        model.close()


# -- Errors and our own graphs -------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--graph", "missing.pb", "--image", "sample_images/circle/circle_000.jpg"], "No such file"),
    (["--graph", "requirements.txt", "--image", "sample_images/circle/circle_000.jpg"],
     "not a frozen TensorFlow GraphDef"),
    (["--graph", "x.pb", "--image", "missing.jpg"], "cannot read file"),
    (["--graph", "x.pb", "--image", "requirements.txt"], "not an image"),
    (["--graph", "x.pb", "--image", "y.jpg", "--input_height", "3"], "give both --input_height and --input_width"),
])
def test_clear_errors(args, message, monkeypatch):
    monkeypatch.chdir(REPO)
    result = label_image_run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_wrong_tensor_name_on_our_graph(demo_model):
    result = label_image_run("--graph", str(demo_model.graph), "--output_layer", "nope",
                      "--image", str(REPO / "sample_images" / "circle" / "circle_000.jpg"))
    assert result.returncode == 2 and "no output tensor named 'nope:0'" in result.stderr


def test_json_names_the_model_as_the_service_does(demo_model, tmp_path):
    """--json's "model" is the service's object, {"name", "version"}, with the same values for the same graph."""
    image = REPO / "sample_images" / "circle" / "circle_000.jpg"
    result = label_image_run("--graph", str(demo_model.graph), "--image", str(image), "--json")
    assert result.returncode == 0, result.stderr
    ours = json.loads(result.stdout)["model"]
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    shutil.copy2(demo_model.graph, graphs / demo_model.graph.name)
    server = Server(graphs, REPO)
    try:
        wait_until(lambda: any(m["version"] for m in server.json("/models")[1]["models"]), "the graph to load")
        status, answer = server.json(f"/?file={image.relative_to(REPO)}")
    finally:
        server.close()
    assert status == 200 and answer["model"] == ours
    assert ours["name"] == demo_model.graph.stem and isinstance(ours["version"], int)
