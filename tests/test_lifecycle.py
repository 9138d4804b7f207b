"""A graph's life after its first retrain: the data it was trained on (manifest), the gate a
replacement must pass (blessing), the versions kept and put back (history, rollback), and older
versions served on request (pinned). Real retrains on tiny generated folders, a real registry
and a real HTTP service."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imageclf import blessing, export, history, manifest
from imageclf.dataset import label_for_folder, split_for
from imageclf.engine.classify import VersionNotFoundError
from imageclf.engine.registry import ModelRegistry
from imageclf.retrain import retrain
from imageclf.retrain_cli import REJECTED
from imageclf.retrain_cli import main as retrain_main
from imageclf.summary import retrain_summary
from imageclf.training import TrainConfig

from .conftest import REPO, quick_options, wait_until
from .service_helpers import Server, held

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200), "yellow": (220, 210, 40)}
TESTING = 40  # percent: enough held-out images (about 6 a class) for the gate to decide on


def make_colours(root: Path, classes=("red", "green", "blue"), per_class: int = 16, start: int = 0) -> None:
    """Small noisy pictures of one colour per class: the tiny test base tells them apart easily."""
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            rng = np.random.default_rng([c, i])
            pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.png")


def options(data: Path, out: Path, tiny_module: Path, steps: int = 150, **overrides):
    opts = quick_options(data, out, tfhub_module=str(tiny_module), testing_percentage=TESTING,
                         training=TrainConfig(steps=steps, eval_step_interval=steps, progress=False,
                                              learning_rate=overrides.pop("learning_rate", 0.05)), **overrides)
    opts.output_graph = str(out / "graphs" / "colours.pb")
    return opts


def cli(data: Path, out: Path, tiny_module: Path, *flags: str) -> int:
    return retrain_main(["--image_dir", str(data), "--output_graph", str(out / "graphs" / "colours.pb"),
                         "--bottleneck_dir", str(out / "bottlenecks"), "--tfhub_module", str(tiny_module),
                         "--testing_percentage", str(TESTING), "--quiet", "--eval_step_interval", "1000", *flags])


def version_of(graph: Path) -> int:
    return export.embedded_metadata(graph)["version"]


@pytest.fixture()
def colours(tmp_path) -> Path:
    data = tmp_path / "data"
    make_colours(data)
    return data


# -- 4. the training-data manifest ------------------------------------------------------------


def test_manifest_records_every_image_and_its_fingerprint_is_stable_until_a_relabel(tmp_path, colours,
                                                                                  tiny_module):
    opts = options(colours, tmp_path, tiny_module, saved_model_dir=str(tmp_path / "saved"))
    first = retrain(opts, log=lambda line: None)
    entries = manifest.parse(first.manifest_file.read_text())
    assert first.manifest_file == tmp_path / "graphs" / "colours.manifest.jsonl"
    assert len(entries) == 48 and [e["path"] for e in entries] == sorted(e["path"] for e in entries)
    for entry in entries:
        path = colours / entry["path"]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["label"] == label_for_folder(path.parent.name)
        assert entry["split"] == split_for(path.name, 10, TESTING)
    fingerprint = manifest.fingerprint(entries)
    # The same fingerprint in the sidecar, the graph itself, the summary and the SavedModel.
    assert json.loads(first.sidecar.read_text())["data"]["fingerprint"] == fingerprint
    assert export.embedded_metadata(first.graph)["data"] == {"fingerprint": fingerprint, "images": 48,
                                                             "manifest": "colours.manifest.jsonl"}
    assert fingerprint in retrain_summary(first)
    assert (first.saved_model / "assets.extra" / "manifest.jsonl").read_text() == first.manifest_file.read_text()

    again = retrain(options(colours, tmp_path, tiny_module), log=lambda line: None)
    assert again.data["fingerprint"] == fingerprint and again.data_diff.unchanged
    assert "same images and labels as the previous graph" in retrain_summary(again)

    shutil.move(colours / "red" / "red_003.png", colours / "green" / "red_003.png")  # one relabel
    relabelled = retrain(options(colours, tmp_path, tiny_module), log=lambda line: None)
    assert relabelled.data["fingerprint"] != fingerprint
    assert relabelled.data_diff.relabelled.to_json() == {"total": 1, "per_class": {"red -> green": 1},
                                                         "paths": ["green/red_003.png"]}


def test_summary_names_images_added_removed_and_relabelled_per_class(tmp_path, colours, tiny_module):
    retrain(options(colours, tmp_path, tiny_module), log=lambda line: None)
    make_colours(colours, classes=("blue",), per_class=12, start=100)       # 12 added
    for i in range(3):
        (colours / "green" / f"green_{i:03d}.png").unlink()                 # 3 removed
    shutil.move(colours / "red" / "red_005.png", colours / "blue" / "was_red.png")  # relabelled and renamed
    shutil.move(colours / "red" / "red_006.png", colours / "red" / "renamed.png")  # renamed only: no change
    result = retrain(options(colours, tmp_path, tiny_module), log=lambda line: None)
    changes = result.data_diff.to_json()
    assert changes["added"]["total"] == 12 and changes["added"]["per_class"] == {"blue": 12}
    assert len(changes["added"]["paths"]) == manifest.MAX_NAMED
    assert changes["removed"] == {"total": 3, "per_class": {"green": 3},
                                  "paths": [f"green/green_{i:03d}.png" for i in range(3)]}
    assert changes["relabelled"] == {"total": 1, "per_class": {"red -> blue": 1}, "paths": ["blue/was_red.png"]}
    text = retrain_summary(result)
    assert "added 12: blue 12" in text and "(+2 more)" in text
    assert "removed 3: green 3" in text and "green/green_000.png, green/green_001.png, green/green_002.png" in text
    assert "relabelled 1: red -> blue 1" in text and "blue/was_red.png" in text
    assert json.loads(result.sidecar.read_text())["data"]["fingerprint"] == result.data["fingerprint"]


def test_a_graph_without_a_manifest_is_replaced_with_a_note_not_an_error(tmp_path, colours, tiny_module):
    first = retrain(options(colours, tmp_path, tiny_module), log=lambda line: None)
    first.manifest_file.unlink()  # as a graph made before manifests existed
    result = retrain(options(colours, tmp_path, tiny_module), log=lambda line: None)
    assert not result.rejected and result.data_diff is None and result.verdict.blessed
    text = retrain_summary(result)
    assert "no comparison: the previous graph's manifest colours.manifest.jsonl is missing" in text
    assert "blessed without a comparison" in text
    assert result.manifest_file.is_file()  # the new graph has one


# -- 5. the blessing gate -----------------------------------------------------------------------


def test_mcnemar_rule_rejects_only_a_significantly_worse_candidate():
    six_lost = blessing.decide([False] * 6 + [True] * 10, [True] * 16)   # p = 1/64
    assert not six_lost.blessed and six_lost.p_value == pytest.approx(1 / 64)
    five_lost_one_won = blessing.decide([False] * 5 + [True] * 11, [True] * 15 + [False])  # p = 7/64
    assert five_lost_one_won.blessed and five_lost_one_won.p_value == pytest.approx(7 / 64)
    assert blessing.decide([True] * 16, [False] * 6 + [True] * 10).blessed  # better: p = 1


def test_a_clearly_worse_candidate_is_kept_aside_with_exit_3_and_the_old_graph_stays_served(
        tmp_path, colours, tiny_module, capsys):
    good = retrain(options(colours, tmp_path, tiny_module), log=lambda line: None)
    assert good.evaluation["accuracy"] >= 0.9
    graphs = tmp_path / "graphs"
    served_bytes, old_version = good.graph.read_bytes(), version_of(good.graph)
    registry = ModelRegistry(graphs)
    registry.scan()
    try:
        # One step at a tiny learning rate: a model that has learnt nothing.
        status = cli(colours, tmp_path, tiny_module, "--how_many_training_steps", "1", "--learning_rate", "1e-5")
        out = capsys.readouterr().out
        assert status == REJECTED == 3
        assert "NOT REPLACED" in out and "REJECTED: clearly worse than the previous graph" in out
        assert good.graph.read_bytes() == served_bytes
        rejected = sorted((graphs / "rejected").glob("colours-*.pb"))
        assert len(rejected) == 1 and rejected[0].with_suffix(".json").is_file()
        assert rejected[0].with_name(rejected[0].stem + ".manifest.jsonl").is_file()
        verdict = json.loads(rejected[0].with_suffix(".json").read_text())["blessing"]
        assert not verdict["blessed"] and verdict["p_value"] < blessing.ALPHA and verdict["n"] >= blessing.MIN_SHARED
        registry.scan()
        with held(registry, "colours") as servable:
            assert servable.version == old_version

        assert cli(colours, tmp_path, tiny_module, "--how_many_training_steps", "1", "--learning_rate", "1e-5",
                   "--force") == 0
        assert "replaced anyway (--force)" in capsys.readouterr().out
        assert version_of(good.graph) > old_version
        registry.scan()
        with held(registry, "colours") as servable:
            assert servable.version == version_of(good.graph)
    finally:
        registry.stop()


def test_a_new_class_does_not_block_and_only_shared_classes_are_compared(tmp_path, colours, tiny_module):
    retrain(options(colours, tmp_path, tiny_module), log=lambda line: None)
    make_colours(colours, classes=("yellow",))
    result = retrain(options(colours, tmp_path, tiny_module), log=lambda line: None)
    assert not result.rejected and result.verdict.blessed and result.verdict.p_value is not None
    test_old_classes = [e for e in manifest.parse(result.manifest_file.read_text())
                        if e["split"] == "test" and e["label"] != "yellow"]
    assert result.verdict.n == len(test_old_classes) < result.evaluation["n"]
    assert result.data_diff.added.per_class == {"yellow": 16}


# -- 6. history and rollback, pinned versions --------------------------------------------------------


def test_history_keeps_n_versions_and_rollback_puts_one_back_for_the_running_service(tmp_path, colours,
                                                                                      tiny_module):
    graphs = tmp_path / "graphs"
    versions = []
    for steps in (20, 60, 150):
        result = retrain(options(colours, tmp_path, tiny_module, steps=steps, keep_versions=2), log=lambda line: None)
        versions.append(version_of(result.graph))
    assert history.history_versions(graphs / "colours.pb") == versions[1:]
    kept = history.version_dir(graphs, "colours", versions[1])
    assert sorted(p.name for p in kept.iterdir()) == ["colours.json", "colours.labels.txt",
                                                       "colours.manifest.jsonl", "colours.pb"]
    server = Server(graphs, tmp_path)
    try:
        wait_until(lambda: server.json("/models")[1]["models"][0]["version"] == versions[2], "newest served")
        assert history.main(["rollback", "colours", "--graphs_dir", str(graphs)]) == 0
        for name in ("colours.pb", "colours.labels.txt", "colours.json", "colours.manifest.jsonl"):
            assert (graphs / name).read_bytes() == (kept / name).read_bytes(), name
        assert not list(graphs.glob(".*.tmp"))  # every file was replaced by a rename
        wait_until(lambda: server.json("/models")[1]["models"][0]["version"] == versions[1],
                   "the rolled-back version served after a poll")
        model = server.json("/models")[1]["models"][0]
        assert model["state"] == "ready" and model["data_fingerprint"] == json.loads(
            (kept / "colours.json").read_text())["data"]["fingerprint"]
    finally:
        server.close()
    # Nothing older is kept than the version now in place: a second rollback says so in one line.
    with pytest.raises(Exception, match="no kept version older"):
        history.rollback(graphs / "colours.pb")
    assert history.rollback(graphs / "colours.pb", to=versions[2]) == versions[2]


def test_rollback_never_shows_the_service_a_graph_without_its_own_labels(tmp_path, tiny_module, monkeypatch):
    graphs = tmp_path / "graphs"
    data = tmp_path / "data"
    make_colours(data, classes=("red", "green"))
    old = version_of(retrain(options(data, tmp_path, tiny_module), log=lambda line: None).graph)
    make_colours(data, classes=("blue",))
    new = version_of(retrain(options(data, tmp_path, tiny_module), log=lambda line: None).graph)
    registry = ModelRegistry(graphs)
    served = []

    def scan():
        registry.scan()
        with held(registry, "colours") as servable:
            served.append((servable.version, tuple(servable.labels)))

    def then_scan(path, data, *args, **kwargs):
        write(path, data, *args, **kwargs)
        scan()

    write = history.write_bytes_atomic
    monkeypatch.setattr(history, "write_bytes_atomic", then_scan)
    try:
        scan()
        assert history.rollback(graphs / "colours.pb") == old
    finally:
        registry.stop()
    assert served[0] == (new, ("blue", "green", "red")) and served[-1] == (old, ("green", "red"))
    assert set(served) == {(new, ("blue", "green", "red")), (old, ("green", "red"))}


def test_a_pinned_version_is_served_by_name_and_version(tmp_path, colours, tiny_module):
    graphs = tmp_path / "graphs"
    old = version_of(retrain(options(colours, tmp_path, tiny_module, steps=5), log=lambda line: None).graph)
    new = version_of(retrain(options(colours, tmp_path, tiny_module, steps=150), log=lambda line: None).graph)
    server = Server(graphs, tmp_path, keep_versions={"colours": {old, 12345}})
    try:
        pinned = lambda: server.json("/models")[1]["models"][0]["pinned_versions"]  # noqa: E731
        wait_until(lambda: any(p["state"] == "ready" for p in pinned()), "pinned version loaded")
        model = server.json("/models")[1]["models"][0]
        assert model["version"] == new
        assert sorted(model["pinned_versions"], key=lambda p: p["version"]) == [
            {"version": 12345, "state": "missing", "last_error": None},
            {"version": old, "state": "ready", "last_error": None}]
        image = (colours / "red" / "red_000.png").read_bytes()
        pinned = server.engine.classify([image], "colours", version=old)
        latest = server.engine.classify([image], "colours", version=new)
        default = server.engine.classify([image], "colours")
        assert (pinned.version, latest.version, default.version) == (old, new, new)
        assert not np.allclose(pinned.scores, latest.scores)  # really the other graph (5 training steps)
        np.testing.assert_allclose(latest.scores, default.scores)
        with pytest.raises(VersionNotFoundError, match="--keep_versions colours=12345"):
            server.engine.classify([image], "colours", version=12345)
    finally:
        server.close()


def test_watch_keeps_serving_the_old_graph_and_keeps_watching_after_a_rejection(tmp_path, colours, tiny_module):
    good = retrain(options(colours, tmp_path, tiny_module), log=lambda line: None)
    served_bytes = good.graph.read_bytes()
    command = [sys.executable, str(REPO / "retrain.py"), "--image_dir", str(colours),
               "--output_graph", str(good.graph), "--bottleneck_dir", str(tmp_path / "bottlenecks"),
               "--tfhub_module", str(tiny_module), "--testing_percentage", str(TESTING), "--quiet",
               "--how_many_training_steps", "1", "--learning_rate", "1e-5", "--watch", "--watch_interval", "0.2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any(line.startswith("Watching") for line in lines), "the watch going on", timeout=120)
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=30)
    reader.join(timeout=10)
    text = "".join(lines)
    assert "Not replaced:" in text and "NOT REPLACED" in text
    assert text.index("Not replaced:") < text.index("Watching")
    assert good.graph.read_bytes() == served_bytes
    assert len(list((tmp_path / "graphs" / "rejected").glob("colours-*.pb"))) == 1
