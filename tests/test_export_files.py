"""What retrain leaves on disk: file modes, durable renames, and SavedModel versions that never clash."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import tensorflow as tf

import imageclf.retrain as retrain_module
from imageclf import export
from imageclf.atomic import write_bytes_atomic, write_text_atomic
from imageclf.graph_model import GraphModel
from imageclf.retrain import retrain
from imageclf.training import TrainConfig
from tests.demo_data import make_dataset

from .conftest import quick_options

INSTANT = 1_800_000_000.25  # a fixed clock reading, in 2027


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export_data")
    make_dataset(root, per_class=6)
    return root


def quick(data: Path, out: Path, tiny_module: Path, **overrides):
    return quick_options(data, out, tfhub_module=str(tiny_module),
                         training=TrainConfig(steps=10, eval_step_interval=10, progress=False), **overrides)


@pytest.fixture()
def same_second(monkeypatch):
    """Stop every clock retrain reads for versions and timestamps at one instant.

    However fast or slow the machine, the retrains of a test then run "in the same second".
    """
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.fromtimestamp(INSTANT, tz or timezone.utc)
    monkeypatch.setattr(retrain_module, "datetime", Frozen)
    monkeypatch.setattr(export, "time", SimpleNamespace(time=lambda: INSTANT), raising=False)


def embedded_version(graph: Path) -> int:
    model = GraphModel(graph)
    try:
        return model.metadata["version"]
    finally:
        model.close()


# -- 1. modes and durability -----------------------------------------------------------------------


def test_outputs_get_the_umask_mode_not_0600(data, tmp_path, tiny_module):
    """A service running as another user must be able to read what retrain wrote."""
    with umask(0o022):
        result = retrain(quick(data, tmp_path, tiny_module, saved_model_dir=str(tmp_path / "serving")),
                         log=lambda s: None)
    for path in (result.graph, result.labels_file, result.sidecar):
        assert mode(path) == 0o644, path
    assert mode(result.saved_model) == 0o755
    for path in result.saved_model.rglob("*"):
        assert mode(path) & 0o444 == 0o444, path  # everything TF Serving loads is readable by all


def test_atomic_writes_follow_the_umask_like_open(tmp_path):
    for mask, expected in [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)]:
        with umask(mask):
            write_text_atomic(tmp_path / f"new{mask}.txt", "x")
            with open(tmp_path / f"plain{mask}.txt", "w") as f:
                f.write("x")
        assert mode(tmp_path / f"new{mask}.txt") == expected == mode(tmp_path / f"plain{mask}.txt")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.fixture()
def fsyncs(monkeypatch):
    """Every fsync as (is a folder, names in that folder at the time)."""
    calls: list[tuple[bool, set[str]]] = []
    real = os.fsync

    def recording(fd):
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        calls.append((is_dir, set(os.listdir(fd)) if is_dir else set()))
        return real(fd)
    monkeypatch.setattr(os, "fsync", recording)
    return calls


def test_durable_write_syncs_the_folder_after_the_rename(tmp_path, fsyncs):
    write_bytes_atomic(tmp_path / "model.pb", b"graph")
    assert [is_dir for is_dir, _ in fsyncs] == [False, True]  # the data, then the folder entry
    assert fsyncs[1][1] == {"model.pb"}  # synced after the rename: no temporary name left


def test_cache_writes_skip_fsync(tmp_path, fsyncs):
    write_bytes_atomic(tmp_path / "entry.npy", b"vector", durable=False)
    assert fsyncs == [] and (tmp_path / "entry.npy").read_bytes() == b"vector"


# -- 2. versions ------------------------------------------------------------------------------------


def test_back_to_back_retrains_in_one_second_get_increasing_versions(data, tmp_path, tiny_module, same_second):
    serving = tmp_path / "serving"
    results = [retrain(quick(data, tmp_path / name, tiny_module, saved_model_dir=str(serving)), log=lambda s: None)
               for name in ("first", "second")]
    versions = [int(r.saved_model.name) for r in results]
    assert versions[0] == int(INSTANT) and versions[1] > versions[0]
    assert sorted(p.name for p in serving.iterdir()) == [str(v) for v in versions]  # no staging left
    for result, version in zip(results, versions, strict=True):
        assert embedded_version(result.graph) == version
        assert json.loads(result.sidecar.read_text())["version"] == version
        loaded = tf.saved_model.load(str(result.saved_model))
        assert loaded.signatures["serving_default"] is not None


def test_replacing_a_graph_raises_its_version_even_in_one_second(data, tmp_path, tiny_module, same_second):
    """Without --saved_model_dir, the previous graph's sidecar keeps versions going up."""
    opts = quick(data, tmp_path, tiny_module)
    first = embedded_version(retrain(opts, log=lambda s: None).graph)
    second = embedded_version(retrain(opts, log=lambda s: None).graph)
    assert second > first == int(INSTANT)


def test_version_is_above_every_folder_already_there(tmp_path):
    serving = tmp_path / "serving"
    for name in (str(int(INSTANT) + 5), f".{int(INSTANT) + 9}.tmp", "not-a-version", "7"):
        (serving / name).mkdir(parents=True)
    reservation = export.reserve_version(serving, None, now=INSTANT)
    assert reservation.version == int(INSTANT) + 10 and reservation.staging.is_dir()
    reservation.release()
    assert not reservation.staging and not (serving / f".{int(INSTANT) + 10}.tmp").exists()
    assert export.reserve_version(None, None, now=INSTANT).version == int(INSTANT)


def test_concurrent_reservations_never_share_a_version(tmp_path):
    got: list[export.VersionReservation] = []
    start = threading.Barrier(8)

    def reserve():
        start.wait()
        got.append(export.reserve_version(tmp_path, None, now=INSTANT))
    threads = [threading.Thread(target=reserve) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.version for r in got) == list(range(int(INSTANT), int(INSTANT) + 8))


def test_version_published_after_the_scan_is_not_reused(tmp_path, monkeypatch):
    """Another retrain publishes version N between our look at the folder and our claim."""
    (tmp_path / str(int(INSTANT))).mkdir()
    monkeypatch.setattr(export, "_newest_version", lambda *args: 0)  # the look saw nothing
    reservation = export.reserve_version(tmp_path, None, now=INSTANT)
    assert reservation.version == int(INSTANT) + 1
    assert {p.name for p in tmp_path.iterdir()} == {str(int(INSTANT)), f".{int(INSTANT) + 1}.tmp"}


class FailingBuilder(tf.compat.v1.saved_model.Builder):
    def save(self, *args, **kwargs):
        raise OSError(28, "No space left on device")


def test_failed_saved_model_leaves_the_previous_graph_in_place(data, tmp_path, tiny_module, monkeypatch):
    opts = quick(data, tmp_path, tiny_module, saved_model_dir=str(tmp_path / "serving"))
    before = retrain(opts, log=lambda s: None)
    files = {p: p.read_bytes() for p in (before.graph, before.labels_file, before.sidecar)}
    monkeypatch.setattr(tf.compat.v1.saved_model, "Builder", FailingBuilder)
    with pytest.raises(OSError, match="No space left"):
        retrain(opts, log=lambda s: None)
    assert {p: p.read_bytes() for p in files} == files
    assert [p.name for p in (tmp_path / "serving").iterdir()] == [before.saved_model.name]


def test_unusable_saved_model_dir_fails_before_anything_is_written(data, tmp_path, tiny_module):
    opts = quick(data, tmp_path, tiny_module, saved_model_dir=str(tmp_path / "a_file"))
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(OSError):
        retrain(opts, log=lambda s: None)
    assert not Path(opts.output_graph).exists() and not Path(opts.output_graph).with_suffix(".json").exists()
