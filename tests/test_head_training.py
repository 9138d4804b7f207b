"""The new layer's training: class-balanced loss for uneven folders."""

from __future__ import annotations

import numpy as np
import pytest

from imageclf.training import TrainConfig, class_weights, sampler_from_arrays, train_final_layer


def test_class_weights_make_every_class_count_alike():
    weights = class_weights(np.array([0] * 10 + [1] * 30 + [2] * 20), 3)
    np.testing.assert_allclose(weights, [2.0, 2 / 3, 1.0], rtol=1e-6)
    # Per class, weight x count is the same: each class carries a third of the loss.
    np.testing.assert_allclose(weights * [10, 30, 20], 20.0, rtol=1e-6)
    np.testing.assert_allclose(class_weights(np.array([0, 1, 0, 1]), 2), [1.0, 1.0])


def _overlapping(rng: np.random.Generator, counts: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian classes that overlap, so the loss must trade errors of one against the other."""
    x = np.concatenate([rng.normal(0.0, 1.0, (counts[0], 8)), rng.normal(0.8, 1.0, (counts[1], 8))])
    return x.astype(np.float32), np.array([0] * counts[0] + [1] * counts[1], np.int32)


@pytest.mark.parametrize("seed", [0, 1])
def test_balanced_loss_stops_a_small_class_from_being_drowned(seed):
    rng = np.random.default_rng(seed)
    train_x, train_y = _overlapping(rng, (400, 25))  # a folder of 400 photos beside one of 25
    test_x, test_y = _overlapping(rng, (500, 500))
    config = TrainConfig(steps=600, eval_step_interval=600, progress=False, seed=seed)

    def recalls(weights):
        layer = train_final_layer(sampler_from_arrays(train_x, train_y), (test_x[:0], test_y[:0]), 8, 2, config,
                                  log=lambda _: None, weights_per_class=weights)
        predicted = layer.probabilities(test_x).argmax(axis=1)
        return [float((predicted[test_y == c] == c).mean()) for c in (0, 1)]

    plain, balanced = recalls(None), recalls(class_weights(train_y, 2))
    assert plain[1] < 0.5  # unweighted, the small class is mostly called the big one
    assert balanced[1] > plain[1] + 0.25
    assert np.mean(balanced) > np.mean(plain) + 0.05  # and the average recall is better for it
