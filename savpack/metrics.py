"""Classification metrics from true and predicted labels (numpy only)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def classification_report(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """accuracy, balanced accuracy, macro-F1, per-class recall and the confusion matrix (rows true, columns predicted)."""
    index = {label: i for i, label in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for true_label, predicted_label in zip(truth, predicted):
        confusion[index[true_label], index[predicted_label]] += 1
    support = confusion.sum(axis=1)
    predicted_count = confusion.sum(axis=0)
    correct = np.diag(confusion)
    recall = np.divide(correct, support, out=np.zeros(len(labels)), where=support > 0)
    precision = np.divide(correct, predicted_count, out=np.zeros(len(labels)), where=predicted_count > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(labels)), where=(precision + recall) > 0)
    present = support > 0
    total = int(confusion.sum())
    return {
        "examples": total,
        "accuracy": float(correct.sum() / total) if total else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_accuracy": {label: float(recall[i]) for i, label in enumerate(labels) if present[i]},
        "labels": list(labels),
        "confusion": confusion.tolist(),
    }
