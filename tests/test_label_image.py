"""label_image.py on our graphs and on graphs from the older retrain scripts."""

from __future__ import annotations

import json
import shutil

import pytest

from .conftest import POETS, REPO, needs_shared, run_tool

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


def poets_top(mean: str, std: str, image: str = "scratch2.png") -> list[dict]:
    """label_image's ranked answer for a Poets sample image with the given scaling."""
    return top(run_tool("label_image.py", *POETS_FLAGS, "--input_mean", mean, "--input_std", std,
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
    result = run_tool("label_image.py", *POETS_FLAGS, "--image", str(POETS / "sample_images" / "scratch2.png"))
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
    best = top(run_tool("label_image.py", "--graph", str(graph), "--json",
                        "--image", str(POETS / "sample_images" / "scratch2.png")))[0]
    assert best["label"] == "61326 wrinkle"


@pytest.mark.parametrize("args, message", [
    (["--graph", "missing.pb", "--image", "sample_images/circle/circle_000.jpg"], "No such file"),
    (["--graph", "requirements.txt", "--image", "sample_images/circle/circle_000.jpg"],
     "not a frozen TensorFlow GraphDef"),
    (["--graph", "x.pb", "--image", "missing.jpg"], "cannot read file"),
    (["--graph", "x.pb", "--image", "requirements.txt"], "not an image"),
    (["--graph", "x.pb", "--image", "y.jpg", "--input_height", "3"], "give both --input_height and --input_width"),
])
def test_clear_errors(args, message):
    result = run_tool("label_image.py", *args, cwd=REPO)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_wrong_tensor_name_on_our_graph(demo_model):
    result = run_tool("label_image.py", "--graph", str(demo_model.graph), "--output_layer", "nope",
                      "--image", str(REPO / "sample_images" / "circle" / "circle_000.jpg"))
    assert result.returncode == 2 and "no output tensor named 'nope:0'" in result.stderr
