"""Whole retrains with a small real base: caching, skipped files, distortions, atomic outputs."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tensorflow as tf

from imageclf.atomic import write_bytes_atomic
from imageclf.bases import load_base
from imageclf.bottlenecks import BottleneckCache
from imageclf.demo_data import make_dataset
from imageclf.errors import UserError
from imageclf.graph_model import GraphModel
from imageclf.preprocess import distort
from imageclf.retrain import retrain
from imageclf.training import TrainConfig

from .conftest import quick_options, run_tool


def test_second_run_computes_only_new_images(tmp_path, tiny_module):
    data = tmp_path / "data"
    make_dataset(data, per_class=12)
    first = retrain(quick_options(data, tmp_path, tfhub_module=str(tiny_module)), log=lambda s: None)
    assert (first.bottlenecks.computed, first.bottlenecks.reused) == (36, 0)

    make_dataset(data, per_class=10, classes=("star",))
    second = retrain(quick_options(data, tmp_path, tfhub_module=str(tiny_module)), log=lambda s: None)
    assert (second.bottlenecks.computed, second.bottlenecks.reused) == (10, 36)
    assert "star" in second.labels and GraphModel(second.graph).labels == second.labels


def test_cache_is_keyed_by_content_and_heals_corrupt_entries(tmp_path, tiny_module):
    data = tmp_path / "data"
    make_dataset(data, per_class=8)
    opts = quick_options(data, tmp_path, tfhub_module=str(tiny_module))
    retrain(opts, log=lambda s: None)
    (data / "circle" / "circle_000.jpg").rename(data / "circle" / "renamed.jpg")  # same bytes
    entries = sorted((tmp_path / "bottlenecks").rglob("*.npy"))
    entries[0].write_bytes(b"garbage")
    entries[1].write_bytes(entries[1].read_bytes()[:40])
    result = retrain(opts, log=lambda s: None)
    assert (result.bottlenecks.computed, result.bottlenecks.reused) == (2, 22)
    assert not list((tmp_path / "bottlenecks").rglob("*.tmp"))


def test_bad_files_are_skipped_and_listed(tmp_path, tiny_module, capsys):
    data = tmp_path / "data"
    make_dataset(data, per_class=10)
    (data / "circle" / "notes.txt").write_text("not a picture")
    (data / "square" / "empty.jpg").write_bytes(b"")
    good = (data / "square" / "square_000.jpg").read_bytes()
    (data / "triangle" / "cut.jpg").write_bytes(good[: len(good) // 3])
    result = retrain(quick_options(data, tmp_path, tfhub_module=str(tiny_module)), log=lambda s: None)
    skipped = "\n".join(result.bottlenecks.skipped)
    assert len(result.bottlenecks.skipped) == 3
    assert "notes.txt: not an image" in skipped and "empty.jpg: empty file" in skipped
    assert "cut.jpg: truncated or corrupt" in skipped
    assert sum(result.split_counts.values()) == 30


def test_class_emptied_by_bad_files_is_named(tmp_path, tiny_module):
    data = tmp_path / "data"
    make_dataset(data, per_class=6, classes=("pug", "husky"))
    (data / "corgi").mkdir()
    for i in range(3):
        (data / "corgi" / f"{i}.jpg").write_bytes(b"not really a jpeg")
    with pytest.raises(UserError, match="class 'corgi' has 0 usable image"):
        retrain(quick_options(data, tmp_path, tfhub_module=str(tiny_module)), log=lambda s: None)


def test_distortions_train_in_batches(tmp_path, tiny_module):
    data = tmp_path / "data"
    make_dataset(data, per_class=8)
    opts = quick_options(data, tmp_path, tfhub_module=str(tiny_module), flip_left_right=True,
                         random_crop=10, random_scale=10, random_brightness=10,
                         training=TrainConfig(steps=20, train_batch_size=16, eval_step_interval=10, progress=False,
                                              summaries_dir=str(tmp_path / "summaries")))
    lines: list[str] = []
    result = retrain(opts, log=lines.append)
    assert result.graph.is_file() and result.evaluation is not None
    assert sum(line.startswith("Step ") for line in lines) == 3  # steps 0, 10 and the last
    assert list((tmp_path / "summaries").glob("events.out.tfevents.*"))


def test_distort_changes_each_image_differently():
    images = tf.constant(np.random.default_rng(0).random((4, 24, 24, 3), dtype=np.float32))
    out = distort(images, flip_left_right=True, random_crop=20, random_scale=20, random_brightness=20,
                  generator=tf.random.Generator.from_seed(1)).numpy()
    assert out.shape == (4, 24, 24, 3) and 0 <= out.min() and out.max() <= 1
    assert not np.allclose(out, images.numpy(), atol=1e-3)
    assert len({round(float(np.abs(o - i).mean()), 5) for o, i in zip(out, images.numpy(), strict=True)}) == 4
    plain = distort(images, flip_left_right=False, random_crop=0, random_scale=0, random_brightness=0)
    np.testing.assert_allclose(plain.numpy(), images.numpy(), atol=1e-5)


def test_graph_replacement_is_atomic_for_readers(tmp_path, tiny_module):
    path = tmp_path / "model.pb"
    base = load_base(str(tiny_module))
    small, large = b"x" * 10, base.graph_def.SerializeToString()
    write_bytes_atomic(path, large)
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(len(path.read_bytes()))
    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(200):
        write_bytes_atomic(path, small if i % 2 else large)
    stop.set()
    thread.join()
    assert seen <= {len(small), len(large)}
    assert [p.name for p in tmp_path.iterdir()] == ["model.pb"]


def test_cli_end_to_end_summary(tmp_path, tiny_module):
    data = tmp_path / "my dogs"
    make_dataset(data, per_class=8)
    (data / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = run_tool("retrain.py", "--image_dir", str(data), "--tfhub_module", str(tiny_module),
                      "--how_many_training_steps", "50", "--quiet", "--print_misclassified_test_images",
                      "--bottleneck_dir", str(tmp_path / "bn"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Final test accuracy = " in out and "Validation accuracy = " in out
    assert "computed 24, reused 0, skipped 1" in out and "broken.png" in out
    assert (tmp_path / "graphs" / "my dogs.pb").is_file()
    assert (tmp_path / "graphs" / "my dogs.labels.txt").read_text().split("\n")[:3] == ["circle", "square", "triangle"]


def test_bottleneck_cache_key_includes_the_base(tmp_path, tiny_module):
    base = load_base(str(tiny_module))
    cache = BottleneckCache(tmp_path, base)
    cache.put("ab" * 32, np.ones(base.bottleneck_size, np.float32))
    assert cache.get("ab" * 32) is not None
    assert cache.get("cd" * 32) is None
    cache.put("ef" * 32, np.ones(3, np.float32))  # wrong width: treated as absent
    assert cache.get("ef" * 32) is None
