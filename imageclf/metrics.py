"""Classification metrics: accuracy, per-class precision/recall/F1 and the confusion matrix."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``[i, j]`` counts images of class i predicted as class j."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy of ``correct`` out of ``n``.

    Unlike the normal approximation it stays inside [0, 1] and is honest for small N and for
    accuracies near 100%, which is where retrain's validation and test sets usually are.
    """
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def format_accuracy(correct: int, n: int) -> str:
    """``87.1% (N=201, 95% CI 81.8-91.0%)``: enough to tell whether two runs really differ."""
    low, high = wilson_interval(correct, n)
    return f"{100 * correct / max(n, 1):.1f}% (N={n}, 95% CI {100 * low:.1f}-{100 * high:.1f}%)"


def evaluation_report(truth: np.ndarray, predicted: np.ndarray, labels: Sequence[str]) -> dict:
    """A JSON-ready report: accuracy, N, per-class precision/recall/F1/support, confusion matrix."""
    matrix = confusion_matrix(truth, predicted, len(labels))
    correct = np.diag(matrix)
    predicted_counts = matrix.sum(axis=0)
    support = matrix.sum(axis=1)
    precision = np.divide(correct, predicted_counts, out=np.zeros(len(labels)), where=predicted_counts > 0)
    recall = np.divide(correct, support, out=np.zeros(len(labels)), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall,
                   out=np.zeros(len(labels)), where=(precision + recall) > 0)
    return {
        "accuracy": float(correct.sum() / max(len(truth), 1)),
        "n": int(len(truth)),
        "accuracy_ci95": [round(v, 4) for v in wilson_interval(int(correct.sum()), int(len(truth)))],
        "per_class": {label: {"precision": round(float(p), 4), "recall": round(float(r), 4),
                              "f1": round(float(f), 4), "support": int(s)}
                      for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=False)},
        "labels": list(labels),
        "confusion_matrix": matrix.tolist(),
    }


def format_report(report: dict) -> str:
    """The per-class table and the confusion matrix as plain text."""
    labels = report["labels"]
    width = max(12, *(len(label) for label in labels))
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for label, row in report["per_class"].items():
        lines.append(f"{label:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  "
                     f"{row['f1']:5.3f}  {row['support']:7d}")
    lines.append("")
    lines.append("Confusion matrix (rows: true class, columns: predicted, in the order above):")
    cell = max(4, len(str(max((max(r) for r in report["confusion_matrix"]), default=0))) + 1)
    for label, row in zip(labels, report["confusion_matrix"], strict=False):
        lines.append(f"{label:<{width}} " + "".join(f"{v:>{cell}d}" for v in row))
    return "\n".join(lines)


def mcnemar_worse_p(candidate_correct: Sequence[bool], previous_correct: Sequence[bool]) -> float:
    """Exact one-sided McNemar test that the candidate is worse than the previous model.

    On paired answers to the same images, only the discordant pairs count: ``b`` images only the
    previous model gets right, ``c`` only the candidate. Were both equally good, ``b`` would be
    Binomial(b + c, 1/2); the p-value is P(X >= b), the chance of a split at least this lopsided
    against the candidate. 1.0 when they never disagree.
    """
    b = sum(p and not c for c, p in zip(candidate_correct, previous_correct, strict=True))
    c = sum(c and not p for c, p in zip(candidate_correct, previous_correct, strict=True))
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, sum(math.comb(n, k) for k in range(b, n + 1)) / 2 ** n)
