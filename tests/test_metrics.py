"""Accuracy with a confidence interval, so two runs can be told apart."""

from __future__ import annotations

import pytest

from imageclf.metrics import format_accuracy, wilson_interval


@pytest.mark.parametrize("correct, n, low, high", [
    (175, 201, 0.8172, 0.9101),   # 87.1% of 201, the Poets comparison
    (179, 201, 0.8398, 0.9266),   # 89.1% of 201: the two intervals overlap, so N=201 cannot separate them
    (20, 20, 0.8389, 1.0),        # all right: the interval still says "not certain"
    (0, 10, 0.0, 0.2775),
])
def test_wilson_interval_matches_known_values(correct, n, low, high):
    got = wilson_interval(correct, n)
    assert got == pytest.approx((low, high), abs=5e-4)
    assert got[0] <= correct / n <= got[1]


def test_interval_narrows_with_more_images():
    widths = [hi - lo for lo, hi in (wilson_interval(9 * n // 10, n) for n in (10, 100, 1000))]
    assert widths[0] > widths[1] > widths[2]


def test_format_accuracy():
    assert format_accuracy(175, 201) == "87.1% (N=201, 95% CI 81.7-91.0%)"
    assert wilson_interval(0, 0) == (0.0, 1.0)
