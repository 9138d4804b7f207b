"""Whole retrains with a small real base: caching, skipped files, distortions, atomic outputs."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import imageclf.preprocess
import imageclf.retrain as retrain_module
from imageclf.atomic import write_bytes_atomic
from imageclf.bases import load_base
from imageclf.bottlenecks import BottleneckCache, get_bottlenecks, with_runtime
from imageclf.dataset import TEST, TRAIN, scan_image_dir, split_for
from imageclf.errors import UserError
from imageclf.graph_model import GraphModel
from imageclf.images import read_image
from imageclf.preprocess_graph import distort
from imageclf.retrain import retrain
from imageclf.training import TrainConfig
from tests.demo_data import make_dataset

from .conftest import quick_options, run_tool, write_frozen_base


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
    make_dataset(data, per_class=6, classes={"pug": "circle", "husky": "square"})
    (data / "corgi").mkdir()
    for i in range(3):
        (data / "corgi" / f"{i}.jpg").write_bytes(b"not really a jpeg")
    with pytest.raises(UserError, match="class 'corgi' has 0 usable image"):
        retrain(quick_options(data, tmp_path, tfhub_module=str(tiny_module)), log=lambda s: None)


@pytest.fixture()
def training_batches(monkeypatch) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every (bottlenecks, class ids) batch that training draws, as train_final_layer receives them."""
    batches: list[tuple[np.ndarray, np.ndarray]] = []
    real = retrain_module.train_final_layer

    def spy(sample, *args, **kwargs):
        def recording(rng, n):
            x, y = sample(rng, n)
            batches.append((np.array(x), np.array(y)))
            return x, y
        return real(recording, *args, **kwargs)
    monkeypatch.setattr(retrain_module, "train_final_layer", spy)
    return batches


def relative_distances(rows: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``[len(rows), len(reference)]``: |row - ref| / |ref|."""
    return np.linalg.norm(rows[:, None] - reference[None], axis=2) / np.linalg.norm(reference, axis=1)[None]


def test_distortions_train_in_batches(tmp_path, tiny_module, training_batches):
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

    # The undistorted bottlenecks of the training images, as cached by this run (by LiteRT, the default).
    base, _ = with_runtime(load_base(str(tiny_module)), "litert")
    labels, files = scan_image_dir(data)
    train = [f for f in files if f.split == TRAIN]
    cached, report = get_bottlenecks([f.path for f in train], base, BottleneckCache(opts.bottleneck_dir, base),
                                     progress=False)
    assert report.reused == len(train)
    plain = np.stack([cached[f.path] for f in train])
    plain_labels = np.array([labels.index(f.label) for f in train])

    x = np.concatenate([batch[0] for batch in training_batches])
    y = np.concatenate([batch[1] for batch in training_batches])
    assert [len(batch[1]) for batch in training_batches] == [16] * 20
    distances = relative_distances(x, plain)
    # Distorted: no row is the cached vector of any training image (uint8 rounding alone moves them
    # by under 0.002); the median row moved by several percent.
    assert distances.min() > 0.005 and np.median(distances.min(axis=1)) > 0.02
    # Freshly distorted at every draw: 320 rows from 16 images, no two alike.
    assert len(np.unique(x.round(6), axis=0)) == len(x) > len(train)
    # Still pictures of their labelled class: most rows lie nearest to an image of that class.
    assert (plain_labels[distances.argmin(axis=1)] == y).mean() > 0.8


def test_without_distortions_training_draws_the_cached_vectors(tmp_path, tiny_module, training_batches):
    """The control for the test above: the same measure sees no distortion when there is none."""
    data = tmp_path / "data"
    make_dataset(data, per_class=8)
    opts = quick_options(data, tmp_path, tfhub_module=str(tiny_module),
                         training=TrainConfig(steps=5, train_batch_size=16, eval_step_interval=10, progress=False))
    retrain(opts, log=lambda s: None)
    base, _ = with_runtime(load_base(str(tiny_module)), "litert")
    train = [f.path for f in scan_image_dir(data)[1] if f.split == TRAIN]
    cached, _ = get_bottlenecks(train, base, BottleneckCache(opts.bottleneck_dir, base), progress=False)
    x = np.concatenate([batch[0] for batch in training_batches])
    assert relative_distances(x, np.stack([cached[p] for p in train])).min(axis=1).max() < 1e-6


MISCLASSIFIED_LINE = re.compile(r"(?P<path>.+)  (?P<truth>\w+) -> (?P<guess>\w+) \((?P<score>[01]\.\d{3})\)")


def write_colour_images(folder: Path, colour: tuple[int, int, int], names: list[str], seed: int) -> None:
    """Noisy pictures of one colour: trivially told apart by any base, so every error is planted."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        noise = np.random.default_rng([seed, i]).normal(0, 20, (40, 48, 3))
        Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(folder / name)


def test_print_misclassified_test_images_lists_exactly_the_errors(tmp_path, tiny_module):
    data = tmp_path / "data"
    write_colour_images(data / "red", (200, 30, 30), [f"red_{i:03d}.png" for i in range(10)], seed=1)
    write_colour_images(data / "blue", (30, 30, 200), [f"blue_{i:03d}.png" for i in range(10)], seed=2)
    # Blue pictures filed under red, chosen to fall in the test split: the errors we expect.
    impostors = [n for n in (f"blue_in_red_{k}.png" for k in range(40)) if split_for(n, 10, 30) == TEST][:2]
    write_colour_images(data / "red", (30, 30, 200), impostors, seed=3)
    opts = quick_options(data, tmp_path, tfhub_module=str(tiny_module), print_misclassified_test_images=True,
                         testing_percentage=30, training=TrainConfig(steps=100, learning_rate=0.5, progress=False,
                                                                     eval_step_interval=100))
    lines: list[str] = []
    result = retrain(opts, log=lines.append)
    printed = lines[lines.index("=== MISCLASSIFIED TEST IMAGES ===") + 1:]
    rows = [MISCLASSIFIED_LINE.fullmatch(line) for line in printed]
    assert all(rows), printed
    assert sorted((row["path"], row["truth"], row["guess"]) for row in rows) == \
        sorted((str(data / "red" / name), "red", "blue") for name in impostors)
    assert all(0.5 < float(row["score"]) <= 1 for row in rows)  # the guess's own score
    # The same errors as the written graph makes on the test split.
    model = GraphModel(result.graph)
    try:
        test_files = [f for f in scan_image_dir(data, 10, 30)[1] if f.split == TEST]
        guesses = model.predict([read_image(f.path) for f in test_files]).argmax(axis=1)
        wrong = {str(f.path) for f, g in zip(test_files, guesses, strict=True) if model.labels[g] != f.label}
    finally:
        model.close()
    assert wrong == {row["path"] for row in rows}
    assert result.evaluation["n"] == len(test_files) > len(impostors)
    assert result.evaluation["accuracy"] == pytest.approx(1 - len(impostors) / len(test_files))


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
    try:
        for i in range(200):
            write_bytes_atomic(path, small if i % 2 else large)
    finally:  # a failed write must not leave the reader spinning (the run would never end)
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
    assert re.search(r"Final validation accuracy = [\d.]+% \(N=\d+, 95% CI [\d.]+-[\d.]+%\)", out)
    assert re.search(r"Final test accuracy = [\d.]+% \(N=\d+, 95% CI [\d.]+-[\d.]+%\)", out)
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


def test_cache_is_not_shared_across_input_sizes_bases_or_preprocessing(tmp_path, tiny_module, monkeypatch):
    """The same images through another base, the same base file at another --base_input_size,
    or another preprocessing version must be computed afresh, never served stale vectors."""
    data = tmp_path / "data"
    paths = make_dataset(data, per_class=2)
    # A frozen graph that takes any image size, so --base_input_size decides what it sees.
    frozen = write_frozen_base(tmp_path / "base", size=None)

    def run(handle: str, size: tuple[int, int] | None = None):
        base = load_base(handle, frozen.spec(size) if handle == str(frozen.graph) else None)
        vectors, report = get_bottlenecks(paths, base, BottleneckCache(tmp_path / "cache", base), progress=False)
        return np.stack([vectors[p] for p in paths]), (report.computed, report.reused)

    small, counts = run(str(frozen.graph), (24, 24))
    assert counts == (6, 0)
    again, counts = run(str(frozen.graph), (24, 24))
    assert counts == (0, 6) and np.array_equal(again, small)
    large, counts = run(str(frozen.graph), (40, 40))
    assert counts == (6, 0) and not np.allclose(large, small, atol=1e-3)  # really seen at 40x40
    assert run(str(tiny_module))[1] == (6, 0)
    assert run(str(tiny_module))[1] == (0, 6)
    monkeypatch.setattr(imageclf.preprocess, "PREPROCESS_VERSION", imageclf.preprocess.PREPROCESS_VERSION + 1)
    assert run(str(frozen.graph), (24, 24))[1] == (6, 0)
    assert run(str(tiny_module))[1] == (6, 0)
