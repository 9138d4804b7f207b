"""What the service shows, and to whom: the Host check (on any Flask) and what /models lists.

A real service (waitress on 127.0.0.1, in a thread) over a real graph retrained on the tiny base,
from photos that hold an identical pair and a label conflict, so the graph's metadata names
training files.
"""

from __future__ import annotations

import json
import shutil

import pytest
from packaging.requirements import Requirement

from service.security import ANY_HOST_PATHS
from tests.demo_data import make_dataset

from .conftest import REPO, tiny_graphs_dir
from .service_helpers import Server

ALLOWED = ("localhost", "127.0.0.1", "imageclf", "imageclf.default", ".svc", ".svc.cluster.local")
COPY = "circle/circle_000_copy.jpg"  # an identical copy, filed with its original
CONFLICT = "square/circle_001_as_square.jpg"  # the same picture under two classes


@pytest.fixture(scope="module")
def served(tiny_module, tmp_path_factory):
    photos = tmp_path_factory.mktemp("exposure_photos")
    make_dataset(photos, per_class=8)
    shutil.copy(photos / "circle" / "circle_000.jpg", photos / COPY)
    shutil.copy(photos / "circle" / "circle_001.jpg", photos / CONFLICT)
    graphs = tiny_graphs_dir(photos, tiny_module, tmp_path_factory.mktemp("exposure_model"), "shapes")
    server = Server(graphs, photos, allowed_hosts=ALLOWED)
    yield server, graphs
    server.close()


def test_models_lists_duplicate_counts_not_training_file_names(served):
    server, graphs = served
    sidecar = json.loads((graphs / "shapes.json").read_text())
    assert COPY in json.dumps(sidecar["duplicates"]) and CONFLICT in json.dumps(sidecar["duplicates"])
    status, answer = server.json("/models")
    assert status == 200
    text = json.dumps(answer)
    for name in (COPY, CONFLICT, "circle_000.jpg", "circle_001.jpg"):
        assert name not in text, name
    duplicates = answer["models"][0]["metadata"]["duplicates"]
    assert duplicates["identical_groups_total"] == 1 and duplicates["label_conflicts_total"] == 1
    assert duplicates["moved"] == sidecar["duplicates"]["moved"]
    assert not any(isinstance(value, list) for value in duplicates.values())
    assert answer["models"][0]["metadata"]["class_counts"] == sidecar["class_counts"]  # the rest as it was


def test_unknown_host_names_get_400_without_relying_on_flask(served):
    server, _ = served
    # Flask before 3.1 ignores TRUSTED_HOSTS: the check must not rest on that setting.
    assert server.app.config["TRUSTED_HOSTS"] is None
    for path in ("/models", "/", "/v1/models/shapes", "/no/such/path"):
        status, answer = server.json(path, headers={"Host": "evil.example:8000"})
        assert status == 400 and "evil.example" in answer["error"], (path, status, answer)
    status, _ = server.json("/models", headers={"Host": "10.244.1.7:8000"})
    assert status == 400  # a pod IP reaches health and metrics only (below)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:8000", "imageclf", "imageclf:8000", "imageclf.default",
                                  "imageclf.default.svc", "imageclf.default.svc.cluster.local:8000",
                                  "IMAGECLF.default.svc.cluster.local.", "localhost:80"])
def test_the_service_names_are_answered(served, host):
    server, _ = served
    assert server.json("/models", headers={"Host": host})[0] == 200


@pytest.mark.parametrize("path", sorted(ANY_HOST_PATHS))
def test_health_and_metrics_answer_any_host(served, path: str):
    """Kubernetes probes and Prometheus scrapes ask by pod IP; these paths are read-only."""
    server, _ = served
    for host in ("10.244.1.7:8000", "evil.example"):
        status, _, body = server.request(path, headers={"Host": host})
        assert status == 200, (path, host, status, body[:200])


@pytest.mark.parametrize("path", ["requirements.txt", "deploy/requirements-runtime.txt"])
def test_requirements_ask_for_flask_3_1(path):
    """Flask 3.1 is what the service is tested on (3.0 ignores TRUSTED_HOSTS; the check above does not use it)."""
    lines = [line.split("#")[0].strip() for line in (REPO / path).read_text().splitlines()]
    (flask,) = [r for r in map(Requirement, filter(None, lines)) if r.name == "flask"]
    assert "3.0.3" not in flask.specifier and "3.1.0" in flask.specifier, flask
