"""retrain --watch: a dropped-in class folder becomes a new label without anyone typing a command."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

from imageclf.graph_model import GraphModel
from imageclf.retrain import retrain
from imageclf.watch import tree_signature, watch
from tests.demo_data import make_dataset

from .conftest import REPO, quick_options


def _labels(graph) -> list[str]:
    try:
        model = GraphModel(graph)
    except Exception:  # noqa: BLE001 - not written yet
        return []
    model.close()
    return model.labels


def _wait_for(predicate, seconds=60.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_watch_retrains_on_added_and_removed_classes_and_survives_bad_states(tmp_path, tiny_module):
    data = tmp_path / "data"
    make_dataset(data, per_class=8)
    opts = quick_options(data, tmp_path, tfhub_module=str(tiny_module))
    lines, results, stop = [], [], threading.Event()
    thread = threading.Thread(target=watch, args=(data, lambda: results.append(retrain(opts, log=lambda s: None)),
                                                  lines.append), kwargs={"interval": 0.1, "settle": 0.5, "stop": stop})
    thread.start()
    try:
        assert _wait_for(lambda: _labels(opts.graph_path()) == ["circle", "square", "triangle"])
        make_dataset(data, per_class=8, classes=("star",))
        assert _wait_for(lambda: "star" in _labels(opts.graph_path()))
        assert results[-1].bottlenecks.computed == 8  # only the new pictures cost time
        (data / "lonely").mkdir()
        shutil.copy(data / "star" / "star_000.jpg", data / "lonely" / "one.jpg")
        assert _wait_for(lambda: any(line.startswith("Not retrained:") and "lonely" in line for line in lines))
        shutil.rmtree(data / "lonely")
        shutil.rmtree(data / "star")
        assert _wait_for(lambda: _labels(opts.graph_path()) == ["circle", "square", "triangle"])
    finally:
        stop.set()
        thread.join(30)
    assert len(results) == 3 and not thread.is_alive()


def test_a_folder_still_being_copied_is_not_trained_half_way(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, per_class=2)
    seen, stop = [], threading.Event()
    thread = threading.Thread(target=watch, args=(data, lambda: seen.append(len(tree_signature(data))), print),
                              kwargs={"interval": 0.05, "settle": 1.0, "stop": stop})
    thread.start()
    try:
        assert _wait_for(lambda: seen == [6])
        for i in range(10):  # a slow copy: one file every 0.2 s, shorter than the settle time
            make_dataset(data, per_class=1, classes=("star",), start=i)
            time.sleep(0.2)
        assert _wait_for(lambda: len(seen) == 2, 10)
        time.sleep(1.5)
    finally:
        stop.set()
        thread.join(10)
    assert seen == [6, 16]  # one retrain, on the whole folder


def test_watch_flag_refuses_a_missing_folder(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "retrain.py"), "--image_dir", str(tmp_path / "none"),
                             "--watch"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no such folder" in result.stderr
    assert "--watch" in subprocess.run([sys.executable, str(REPO / "retrain.py"), "--help"], capture_output=True,
                                       text=True, timeout=120).stdout
    assert "Traceback" not in result.stderr
