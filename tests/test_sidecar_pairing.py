"""A service polling the graphs folder while a retrain writes into it never pairs a graph with
another graph's files: checked with the real registry, scanning after each file retrain writes."""

from __future__ import annotations

import json
import shutil

from imageclf import export
from imageclf.engine.registry import ModelRegistry
from imageclf.retrain import retrain
from imageclf.training import TrainConfig
from tests.demo_data import make_dataset

from .conftest import quick_options
from .service_helpers import held


class Polling:
    """A real ModelRegistry on ``graphs``, scanned after every file export writes (as its poller
    would, had it woken up at that moment), recording each load and what is served."""

    def __init__(self, graphs, monkeypatch):
        self.registry = ModelRegistry(graphs)
        self.loads: list[tuple[str, bool]] = []
        self.served: list[tuple[int, list[str]]] = []
        self.registry.add_listener(lambda name, ok: self.loads.append((name, ok)))
        for writer in ("write_bytes_atomic", "write_text_atomic"):
            monkeypatch.setattr(export, writer, self._then_scan(getattr(export, writer)))

    def _then_scan(self, write):
        def written(path, data, *args, **kwargs):
            write(path, data, *args, **kwargs)
            self.scan()
        return written

    def scan(self) -> None:
        self.registry.scan()
        with held(self.registry) as servable:
            self.served.append((servable.version, list(servable.labels)))

    def close(self) -> None:
        self.registry.stop()


def quick(data, out, tiny_module, graphs):
    opts = quick_options(data, out, tfhub_module=str(tiny_module),
                         training=TrainConfig(steps=10, eval_step_interval=10, progress=False))
    opts.output_graph = str(graphs / "defects.pb")
    return opts


def test_a_retrain_replacing_another_scripts_graph_never_fails_a_load(tmp_path, poets_like_graph, tiny_module,
                                                                      monkeypatch):
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    shutil.copy(poets_like_graph.graph, graphs / "defects.pb")
    shutil.copy(poets_like_graph.labels_file, graphs / "defects.labels.txt")
    (graphs / "defects.json").write_text(json.dumps(poets_like_graph.settings_json("defects.labels.txt")))
    data = tmp_path / "data"
    make_dataset(data, per_class=6)
    polling = Polling(graphs, monkeypatch)
    try:
        polling.scan()
        result = retrain(quick(data, tmp_path, tiny_module, graphs), log=lambda line: None)
    finally:
        polling.close()
    assert all(ok for _, ok in polling.loads), polling.loads
    new = json.loads(result.sidecar.read_text())["version"]
    old_labels, new_labels = poets_like_graph.labels, ["circle", "square", "triangle"]
    assert polling.served[0][1] == old_labels and polling.served[-1] == (new, new_labels)
    # Every state served was one graph with its own labels: the old one, then the new one.
    assert all(labels == old_labels or (version, labels) == (new, new_labels) for version, labels in polling.served)


def test_each_retrain_is_loaded_once_and_never_paired_with_the_old_sidecar(tmp_path, tiny_module, monkeypatch):
    retrains = 2
    graphs = tmp_path / "graphs"
    data = tmp_path / "data"
    make_dataset(data, per_class=6)
    opts = quick(data, tmp_path, tiny_module, graphs)
    first = retrain(opts, log=lambda line: None)
    polling = Polling(graphs, monkeypatch)
    versions = [json.loads(first.sidecar.read_text())["version"]]
    try:
        polling.scan()
        for i in range(retrains):
            make_dataset(data, per_class=2, classes=("star",), start=10 * i)
            versions.append(json.loads(retrain(opts, log=lambda line: None).sidecar.read_text())["version"])
    finally:
        polling.close()
    assert len(polling.loads) == 1 + retrains and all(ok for _, ok in polling.loads), polling.loads
    assert sorted({version for version, _ in polling.served}) == versions
