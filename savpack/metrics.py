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


ECE_BINS = 15
COVERAGES = (0.5, 0.8, 0.9)
CURVE_COVERAGES = tuple(round(0.05 * step, 2) for step in range(1, 21))  # the risk-coverage curve's points


def expected_calibration_error(truth: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> float:
    """truth (N,) class index, probabilities (N, C): sum over equal-width confidence bins of
    |accuracy - mean confidence| x share of items, where confidence is the top probability and accuracy whether its
    class is the true one. The top edge belongs to the last bin."""
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == truth
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def reliability_bins(truth: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per non-empty bin: its range, item count, mean confidence and accuracy (the reliability diagram's points)."""
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == truth
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    return [{"low": b / bins, "high": (b + 1) / bins, "count": int((which == b).sum()),
             "confidence": float(confidence[which == b].mean()), "accuracy": float(correct[which == b].mean())}
            for b in range(bins) if (which == b).any()]


def risk_coverage(truth: np.ndarray, predictions: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (n/N for n = 1..N) and accuracy of the n most confident items (top probability, ties in input order)."""
    order = np.argsort(-probabilities.max(axis=1), kind="stable")
    correct = (predictions[order] == truth[order]).astype(np.float64)
    counts = np.arange(1, len(truth) + 1)
    return counts / len(truth), np.cumsum(correct) / counts


def accuracy_at_coverage(truth: np.ndarray, predictions: np.ndarray, probabilities: np.ndarray, coverage: float) -> float:
    """Accuracy of the labels of the ceil(coverage x N) items with the highest top probability."""
    keep = max(1, int(np.ceil(coverage * len(truth) - 1e-9)))
    _, accuracy = risk_coverage(truth, predictions, probabilities)
    return float(accuracy[keep - 1])


def calibration_report(truth: np.ndarray, probabilities: np.ndarray, calibrated: bool = True,
                       predictions: np.ndarray | None = None) -> dict[str, Any]:
    """ECE (15 bins), Brier score (mean over items of the summed squared error), log loss, and the accuracy of the
    labels at 50%, 80% and 90% coverage (most confident first). predictions: the labels' class indices (default:
    the argmax of the probabilities). calibrated False: the probabilities are vote shares (a format-1 pack)."""
    truth = np.asarray(truth, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predictions = probabilities.argmax(axis=1) if predictions is None else np.asarray(predictions)
    onehot = np.eye(probabilities.shape[1])[truth]
    true_probability = probabilities[np.arange(len(truth)), truth]
    return {
        "probabilities": "calibrated" if calibrated else "vote shares (the pack carries no calibration)",
        "ece": expected_calibration_error(truth, probabilities),
        "brier": float(np.mean(np.sum((probabilities - onehot) ** 2, axis=1))),
        "log_loss": float(-np.mean(np.log(np.maximum(true_probability, 1e-12)))),
        "accuracy_at_coverage": {f"{int(c * 100)}%": accuracy_at_coverage(truth, predictions, probabilities, c)
                                 for c in COVERAGES},
        "reliability": reliability_bins(truth, probabilities),
        "coverage_curve": [{"coverage": c, "accuracy": accuracy_at_coverage(truth, predictions, probabilities, c)}
                           for c in CURVE_COVERAGES],
    }
