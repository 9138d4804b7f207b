"""Retraining: labelled folders -> bottlenecks -> new softmax layer -> frozen graph."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from imageclf import blessing, export, history, manifest
from imageclf.base_names import DEFAULT_BASE
from imageclf.bases import BaseModel, FrozenGraphSpec, load_base
from imageclf.bottlenecks import BottleneckCache, BottleneckReport, feature_function, get_bottlenecks, with_runtime
from imageclf.dataset import TEST, TRAIN, VALIDATION, ImageFile, check_trainable, scan_image_folder
from imageclf.duplicates import DuplicateReport, near_duplicates, unify_identical
from imageclf.fine_tune import FineTuneConfig, check_fine_tunable, decoded_images, fine_tune, tunable_base
from imageclf.image_files import DEFAULT_MAX_FILE_MB, MIB, FileRules
from imageclf.images import DEFAULT_MAX_PIXELS
from imageclf.metrics import evaluation_report, format_accuracy, format_report, wilson_interval
from imageclf.preprocess_graph import distort
from imageclf.training import FinalLayer, TrainConfig, class_weights, sampler_from_arrays, train_final_layer

_RUNTIME_NAMES = {"tf": "TensorFlow", "litert": "LiteRT"}


@dataclass
class RetrainOptions:
    image_dir: str
    output_graph: str | None = None
    output_labels: str | None = None
    bottleneck_dir: str | None = "bottlenecks"
    tfhub_module: str = DEFAULT_BASE
    frozen_base: FrozenGraphSpec = field(default_factory=FrozenGraphSpec)
    #: What runs the base for the cached bottlenecks (bottlenecks.with_runtime); the graph is the same.
    runtime: str = "litert"
    training: TrainConfig = field(default_factory=TrainConfig)
    testing_percentage: float = 10
    validation_percentage: float = 10
    test_batch_size: int = -1
    print_misclassified_test_images: bool = False
    final_tensor_name: str = "final_result"
    flip_left_right: bool = False
    random_crop: float = 0
    random_scale: float = 0
    random_brightness: float = 0
    saved_model_dir: str | None = None
    batch_size: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: Files over this size are skipped unread (--max_file_mb).
    max_file_bytes: int = DEFAULT_MAX_FILE_MB * MIB
    #: Follow symlinks that lead outside image_dir (by default they are left out and reported).
    follow_symlinks: bool = False
    #: Also train the base's top blocks (see fine_tune.py); None trains the new layer only.
    fine_tune: FineTuneConfig | None = None
    #: Replace the graph even when the blessing gate finds the candidate clearly worse (blessing.py).
    force: bool = False
    #: Versions of the graph kept in graphs/history/NAME/ (history.py).
    keep_versions: int = history.DEFAULT_KEEP

    @property
    def distortions(self) -> bool:
        return bool(self.flip_left_right or self.random_crop or self.random_scale or self.random_brightness)

    def file_rules(self) -> FileRules:
        """How the files of image_dir may be read (image_files.FileRules)."""
        return FileRules(str(self.image_dir), self.max_file_bytes, self.follow_symlinks)

    def graph_path(self) -> Path:
        if self.output_graph:
            return Path(self.output_graph)
        return Path("graphs") / f"{Path(self.image_dir).resolve().name}.pb"

    def labels_path(self) -> Path:
        return Path(self.output_labels) if self.output_labels else self.graph_path().with_suffix(".labels.txt")


@dataclass
class RetrainResult:
    graph: Path
    labels_file: Path
    sidecar: Path
    saved_model: Path | None
    labels: list[str]
    bottlenecks: BottleneckReport
    split_counts: dict[str, int]
    evaluation: dict | None
    validation_accuracy: float | None
    seconds: float
    duplicates: DuplicateReport = field(default_factory=DuplicateReport)
    data: dict = field(default_factory=dict)          # the metadata's "data": fingerprint, images, manifest
    manifest_file: Path | None = None
    data_diff: manifest.DataDiff | None = None        # against the graph replaced, when it has a manifest
    data_note: str | None = None                      # why there is no diff, when there is a previous graph
    verdict: blessing.Verdict | None = None           # None: no previous graph to compare with
    rejected: bool = False                            # the candidate went to graphs/rejected/, not in place
    replaces: Path | None = None                      # the graph it replaced (or, rejected, would have)


def retrain(opts: RetrainOptions, log: Callable[[str], None] = tqdm.write) -> RetrainResult:
    """Run a whole retrain; raises UserError for anything the user can fix."""
    started = time.time()
    scan = scan_image_folder(opts.image_dir, opts.validation_percentage, opts.testing_percentage,
                             follow_symlinks=opts.follow_symlinks)
    labels, files = scan.labels, scan.files
    log(f"Found {len(labels)} classes and {len(files):,} files in {opts.image_dir}"
        + (f"; left out {len(scan.skipped):,} symlink(s) leading outside it" if scan.skipped else ""))
    if opts.fine_tune:
        check_fine_tunable(opts.tfhub_module, opts.fine_tune.blocks)  # before minutes of bottlenecks, not after
    base, why_not = with_runtime(load_base(opts.tfhub_module, opts.frozen_base), opts.runtime)
    log(f"Base model: {base.description} ({base.input_size[0]}x{base.input_size[1]}, "
        f"{base.bottleneck_size} features; bottlenecks by {_RUNTIME_NAMES[base.runtime]})")
    if why_not:
        log(f"Note: {why_not}")
    cache = BottleneckCache(opts.bottleneck_dir, base) if opts.bottleneck_dir else None
    vectors, report = get_bottlenecks([f.path for f in files], base, cache, batch_size=opts.batch_size,
                                      max_pixels=opts.max_pixels, progress=opts.training.progress,
                                      rules=opts.file_rules())
    for error in scan.skipped:
        report.skip(error)
    log(f"Bottlenecks: {report.summary()}" + (f" (cache {cache.dir})" if cache else ""))
    files, duplicates = unify_identical([f for f in files if f.path in vectors], report.keys,
                                        opts.validation_percentage, opts.testing_percentage)
    check_trainable(labels, files)
    duplicates.near = near_duplicates(files, vectors)
    for line in duplicates.lines():
        log(line)
    class_id = {label: i for i, label in enumerate(labels)}
    splits = {name: _arrays([f for f in files if f.split == name], vectors, class_id, base)
              for name in (TRAIN, VALIDATION, TEST)}
    split_counts = {name: len(y) for name, (_, y) in splits.items()}
    log("Images: " + ", ".join(f"{name} {n:,}" for name, n in split_counts.items()))

    # With --fine_tune the distortions belong to fine-tuning; the new layer starts on cached bottlenecks.
    sampler = (_distorted_sampler([f for f in files if f.split == TRAIN], class_id, base, opts)
               if opts.distortions and not opts.fine_tune else sampler_from_arrays(*splits[TRAIN]))
    weights = class_weights(splits[TRAIN][1], len(labels)) if opts.training.class_balance else None
    layer = train_final_layer(sampler, splits[VALIDATION], base.bottleneck_size, len(labels),
                              opts.training, log=log, weights_per_class=weights)
    fine_tuned = None
    if opts.fine_tune:
        base, layer, fine_tuned = _fine_tune(opts, base, layer, files, splits, log)
        splits = {name: (_features(base, [f for f in files if f.split == name], opts), y)
                  for name, (_, y) in splits.items()}

    validation_x, validation_y = splits[VALIDATION]
    if len(validation_y):
        correct = int((layer.probabilities(validation_x).argmax(axis=1) == validation_y).sum())
        log(f"Final validation accuracy = {format_accuracy(correct, len(validation_y))}")
    test_files = [f for f in files if f.split == TEST]
    evaluation = _evaluate(layer, splits[TEST], labels, opts, test_files, log)
    accuracies = {name: _accuracy(layer, *splits[name]) for name in (TRAIN, VALIDATION, TEST)}
    entries = manifest.entries_for(files, report.keys, opts.image_dir)
    previous = _previous(opts.graph_path(), entries)
    verdict = None
    if previous.exists:
        predicted = (layer.probabilities(splits[TEST][0]).argmax(axis=1) if len(splits[TEST][1])
                     else np.zeros(0, np.int64))
        verdict = blessing.judge(opts.graph_path(), previous.entries, previous.note, test_files, report.keys,
                                 labels, predicted, opts.file_rules(), opts.max_pixels, log)
        verdict.forced = not verdict.blessed and opts.force
        log(f"Blessing: {verdict.line()}")
    rejected = verdict is not None and not verdict.blessed and not verdict.forced
    # The version is claimed before anything is written, and the SavedModel written before the
    # graph: a clash or a failure then leaves the previous graph in place, never half a release.
    # A rejected candidate publishes no SavedModel (TF Serving would serve it).
    reservation = export.reserve_version(None if rejected else opts.saved_model_dir, opts.graph_path())
    graph_path, labels_path = opts.graph_path(), opts.labels_path()
    if rejected:
        graph_path = rejected_path(opts.graph_path(), reservation.version)
        labels_path = graph_path.with_suffix(".labels.txt")
    text = manifest.to_text(entries)
    try:
        metadata = _metadata(opts, base, labels, files, accuracies, report, reservation.version)
        metadata["duplicates"] = duplicates.metadata()
        metadata["data"] = manifest.summary(entries, manifest.manifest_path(graph_path))
        if verdict is not None:
            metadata["blessing"] = verdict.to_json()
        if fine_tuned is not None:
            metadata["fine_tune"] = fine_tuned
        graph_def = export.build_graph(base, layer, labels, metadata, opts.final_tensor_name, opts.max_pixels)
        saved_model = (export.write_saved_model(graph_def, metadata, opts.saved_model_dir, reservation, text)
                       if opts.saved_model_dir and not rejected else None)
    finally:
        reservation.release()  # a no-op once the SavedModel is published
    if not rejected:
        _keep_previous(opts.graph_path(), previous.version)
    sidecar = export.write_outputs(graph_def, metadata, evaluation, graph_path, labels_path, text)
    if not rejected:
        history.archive(graph_path, reservation.version, labels_path)
        history.prune(graph_path, opts.keep_versions, in_place=reservation.version)
    return RetrainResult(graph=graph_path, labels_file=labels_path, sidecar=sidecar,
                         saved_model=saved_model, labels=labels, bottlenecks=report,
                         split_counts=split_counts, evaluation=evaluation,
                         validation_accuracy=accuracies[VALIDATION], seconds=time.time() - started,
                         duplicates=duplicates, data=metadata["data"],
                         manifest_file=manifest.manifest_path(graph_path),
                         data_diff=previous.diff, data_note=previous.note if previous.exists else None,
                         verdict=verdict, rejected=rejected, replaces=opts.graph_path())


@dataclass
class _Previous:
    """The graph a retrain would replace: is there one, its version, and its manifest if it has one."""

    exists: bool = False
    version: int | None = None
    entries: list[dict] | None = None
    note: str | None = None                 # why there is no manifest to compare with
    diff: manifest.DataDiff | None = None   # against the new run's manifest


def _previous(graph: Path, entries: list[dict]) -> _Previous:
    if not graph.is_file():
        return _Previous()
    metadata = export.embedded_metadata(graph)
    version = (metadata or {}).get("version")
    old, note = manifest.read_for_graph(graph, metadata)
    return _Previous(True, version if isinstance(version, int) else None, old, note,
                     manifest.diff(old, entries) if old is not None else None)


def _keep_previous(graph: Path, version: int | None) -> None:
    """Keep the graph about to be replaced in the history, if it is not kept yet (a graph made before
    history existed, or put in place by hand); one without a version of ours is not kept."""
    if version is not None:
        history.archive(graph, version)


def rejected_path(graph: Path, version: int) -> Path:
    """Where a rejected candidate goes: ``graphs/rejected/NAME-<version>.pb``, outside the service's
    ``graphs/*.pb`` pattern."""
    return graph.parent / "rejected" / f"{graph.stem}-{version}.pb"


def fine_tune_config(opts: RetrainOptions) -> FineTuneConfig:
    """Fine-tuning's settings: the distortion flags, when any is given, replace its own
    augmentation (all four of them: one given alone turns the others off)."""
    if not opts.distortions:
        return opts.fine_tune
    return replace(opts.fine_tune, flip_left_right=opts.flip_left_right, random_crop=opts.random_crop,
                   random_scale=opts.random_scale, random_brightness=opts.random_brightness)


def _fine_tune(opts: RetrainOptions, base: BaseModel, layer: FinalLayer, files: list[ImageFile],
               splits: dict, log) -> tuple[BaseModel, FinalLayer, dict]:
    """The base's top blocks and the new layer trained together."""
    config = fine_tune_config(opts)
    images = {name: decoded_images([f.path for f in files if f.split == name], base.input_size, opts.max_pixels,
                                   opts.batch_size, opts.training.progress, desc=f"Decoding {name} images",
                                   rules=opts.file_rules())
              for name in (TRAIN, VALIDATION)}
    result = fine_tune((images[TRAIN], splits[TRAIN][1]), (images[VALIDATION], splits[VALIDATION][1]),
                       layer, config, log=log, tunable=tunable_base(opts.tfhub_module, base.input_size))
    return result.base, result.layer, result.report


def _features(base: BaseModel, files: list[ImageFile], opts: RetrainOptions) -> np.ndarray:
    """Bottlenecks through a fine-tuned base: computed afresh, never cached (the base is new)."""
    vectors, _ = get_bottlenecks([f.path for f in files], base, None, batch_size=opts.batch_size,
                                 max_pixels=opts.max_pixels, progress=opts.training.progress,
                                 rules=opts.file_rules())
    if not files:
        return np.zeros((0, base.bottleneck_size), np.float32)
    return np.stack([vectors[f.path] for f in files])


def _arrays(files: list[ImageFile], vectors: dict, class_id: dict, base: BaseModel):
    x = np.stack([vectors[f.path] for f in files]) if files else np.zeros((0, base.bottleneck_size), np.float32)
    return x, np.array([class_id[f.label] for f in files], dtype=np.int32)


def _accuracy(layer: FinalLayer, x: np.ndarray, y: np.ndarray) -> float | None:
    return float((layer.probabilities(x).argmax(axis=1) == y).mean()) if len(y) else None


def _evaluate(layer: FinalLayer, test: tuple[np.ndarray, np.ndarray], labels: list[str],
              opts: RetrainOptions, test_files: list[ImageFile], log) -> dict | None:
    x, y = test
    if opts.test_batch_size >= 0:
        keep = np.random.default_rng(opts.training.seed).permutation(len(y))[:opts.test_batch_size]
        x, y, test_files = x[keep], y[keep], [test_files[i] for i in keep]
    if not len(y):
        log("No test images (--testing_percentage is 0 or the classes are small); skipping the test.")
        return None
    probabilities = layer.probabilities(x)
    predicted = probabilities.argmax(axis=1)
    report = evaluation_report(y, predicted, labels)
    log(f"Final test accuracy = {format_accuracy(round(report['accuracy'] * report['n']), report['n'])}")
    log(format_report(report))
    if opts.print_misclassified_test_images:
        log("=== MISCLASSIFIED TEST IMAGES ===")
        for f, truth, guess, p in zip(test_files, y, predicted, probabilities, strict=False):
            if truth != guess:
                log(f"{f.path}  {labels[truth]} -> {labels[guess]} ({p[guess]:.3f})")
    return report


def _metadata(opts: RetrainOptions, base: BaseModel, labels: list[str], files: list[ImageFile],
              accuracies: dict, report: BottleneckReport, version: int) -> dict:
    now = datetime.now(timezone.utc)
    counts = {label: {name: 0 for name in (TRAIN, VALIDATION, TEST)} for label in labels}
    for f in files:
        counts[f.label][f.split] += 1
    return export.graph_metadata(base, labels, opts.final_tensor_name, {
        "name": opts.graph_path().stem,
        "version": version,
        "created": now.isoformat(timespec="seconds"),
        "class_counts": counts,
        "accuracy": accuracies,
        "accuracy_ci95": _intervals(accuracies, files),
        "skipped_files": len(report.skipped),
        "image_bytes_max_pixels": opts.max_pixels,
        "training": {"steps": opts.training.steps, "learning_rate": opts.training.learning_rate,
                     "train_batch_size": opts.training.train_batch_size,
                     "class_balance": opts.training.class_balance,
                     "distortions": {"flip_left_right": opts.flip_left_right, "random_crop": opts.random_crop,
                                     "random_scale": opts.random_scale,
                                     "random_brightness": opts.random_brightness}},
    })


def _intervals(accuracies: dict, files: list[ImageFile]) -> dict:
    """95% Wilson intervals of each split's accuracy (see metrics.wilson_interval)."""
    sizes = {name: sum(1 for f in files if f.split == name) for name in accuracies}
    return {name: [round(v, 4) for v in wilson_interval(round(acc * sizes[name]), sizes[name])]
            for name, acc in accuracies.items() if acc is not None}


def _distorted_sampler(train_files: list[ImageFile], class_id: dict, base: BaseModel, opts: RetrainOptions):
    """Batches of freshly distorted training images, one graph call per batch (never per image)."""
    images = decoded_images([f.path for f in train_files], base.input_size, opts.max_pixels, opts.batch_size,
                            opts.training.progress, desc="Decoding for distortions", rules=opts.file_rules())
    y = np.array([class_id[f.label] for f in train_files], dtype=np.int32)
    features = feature_function(base)
    generator = tf.random.Generator.from_seed(opts.training.seed)

    @tf.function
    def distorted_features(batch):
        x = tf.image.convert_image_dtype(batch, tf.float32)
        return features(distort(x, flip_left_right=opts.flip_left_right, random_crop=opts.random_crop,
                                random_scale=opts.random_scale, random_brightness=opts.random_brightness,
                                generator=generator))

    def sample(rng: np.random.Generator, n: int):
        idx = np.arange(len(y)) if n < 0 else rng.integers(0, len(y), size=n)
        return distorted_features(tf.constant(images[idx])).numpy(), y[idx]
    return sample
