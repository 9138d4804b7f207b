"""Classification metrics: accuracy, per-class precision/recall/F1 and the confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``[i, j]`` counts images of class i predicted as class j."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


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
