"""What a newcomer meets first at the command line: one line, never a usage dump or a traceback.

Every check runs the tools as a user runs them (``python retrain.py``, ``python -m service``...) in a
child process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.demo_data import make_dataset

from .conftest import REPO

TOOLS = {"retrain.py": [str(REPO / "retrain.py")], "label_image.py": [str(REPO / "label_image.py")],
         "python -m service": ["-m", "service"]}


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("prog", TOOLS)
def test_a_python_without_the_requirements_gets_one_line(prog):
    """-S leaves site-packages out: this very interpreter, as a system Python without the virtualenv is."""
    result = _run("-S", "-E", *TOOLS[prog], "--help")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"{prog}: error: missing package ")
    assert "bash scripts/setup.sh" in result.stderr and ".venv/bin/python" in result.stderr


@pytest.mark.parametrize("prog, args, line", [
    ("retrain.py", ["--image_directory", "dogs"],
     "retrain.py: error: unknown flag --image_directory; did you mean --image_dir?"),
    ("retrain.py", ["--image_dir", "dogs", "--how_many_steps=10"],
     "retrain.py: error: unknown flag --how_many_steps; did you mean --how_many_training_steps?"),
    ("label_image.py", ["--graph", "g.pb", "--image", "x.jpg", "--topk", "3"],
     "label_image.py: error: unknown flag --topk; did you mean --top_k?"),
    ("python -m service", ["--grpc-port", "0"], "python -m service: error: unknown flag --grpc-port; did you mean "
                                               "--grpc_port?"),
    ("python -m service", ["--xyzzy"], "python -m service: error: unknown flag --xyzzy (see python -m service --help)"),
])
def test_a_mistyped_flag_is_one_line_naming_the_closest(prog, args, line):
    result = _run(*TOOLS[prog], *args)
    assert result.returncode == 2 and result.stderr == line + "\n" and result.stdout == ""


def test_a_missing_required_flag_is_one_line_too():
    result = _run(*TOOLS["retrain.py"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--image_dir" in result.stderr and "usage:" not in result.stderr


def test_tensorflow_starts_quietly_at_the_images_log_level():
    """The container image sets TF_CPP_MIN_LOG_LEVEL=2 (deploy/Dockerfile): TensorFlow's CUDA probing, printed
    before its logging reads that variable, must not reach the log at every start."""
    image_level = "2"
    assert f"TF_CPP_MIN_LOG_LEVEL={image_level}" in (REPO / "deploy" / "Dockerfile").read_text()
    code = "from imageclf.cli_common import quiet_tensorflow; quiet_tensorflow(); import tensorflow; print('ok')"
    result = _run("-c", code, env={"TF_CPP_MIN_LOG_LEVEL": image_level})
    assert result.returncode == 0 and result.stdout == "ok\n"
    assert result.stderr == ""


def test_saved_model_export_prints_no_deprecation_warning(tiny_module, tmp_path):
    make_dataset(tmp_path / "photos", per_class=6, classes=("circle", "square"))
    result = _run(*TOOLS["retrain.py"], "--image_dir", str(tmp_path / "photos"), "--tfhub_module", str(tiny_module),
                  "--how_many_training_steps", "20", "--quiet", "--output_graph", str(tmp_path / "graphs" / "s.pb"),
                  "--bottleneck_dir", str(tmp_path / "bottlenecks"), "--saved_model_dir", str(tmp_path / "saved"))
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "saved").glob("*/saved_model.pb"))) == 1
    assert "deprecat" not in result.stderr.lower(), result.stderr
