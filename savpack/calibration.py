"""Fitting a pack's scoring model on the labelled examples alone: calibrated probabilities and the linear head.

Everything here is fitted out of fold: the labelled examples are split into stratified folds; each fold is scored
by heads selected, centroids (and a probe) computed from the other folds only, so no example is scored by a model
that saw it, as a new item will be (`reselect`: SavClassifier's own selection on the other folds). The fitted
parameters are what savpack_runtime.scoring applies:

- vote packs: temperature and sharpness of the head posteriors, minimising the log loss of the out-of-fold
  probabilities (`fit_head_calibration`).
- probe packs: a linear discriminant over the heads' unit vectors (class means, a pooled within-class covariance
  shrunk towards its diagonal), its shrinkage chosen by the out-of-fold log loss, then a temperature on the
  out-of-fold logits (`train_probes`, `fit_temperature`). It is solved through one eigendecomposition of the
  standardised within-class deviations' Gram matrix, which gives every shrinkage at once in O(N^2 F).
- `classifier="auto"` compares the out-of-fold accuracy of the vote and the probe and keeps the probe only when it
  is clearly better (AUTO_MARGIN).

Shapes: N examples, k heads, C classes, D = head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from savpack_runtime.scoring import Scoring, probe_features, probe_logits, softmax
from savpack_runtime.vote import VOTE_METHODS, cosine_to_centroids, vote

from .errors import BuildError

FOLDS = 5
CLASSIFIER_CHOICES = ("vote", "probe", "auto")
DEFAULT_CLASSIFIER = "auto"
# Shrinkage of the probe's covariance towards its diagonal (0: the pooled covariance, 1: features independent), chosen
# by the out-of-fold log loss. With 40-1000 examples and 640-5120 features the chosen value spans 0.05-0.98.
PROBE_SHRINKAGE_GRID = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.98)
# A feature's within-class deviation is floored at this share of the features' mean deviation or of their root mean
# square, the larger (a feature constant within every class would otherwise get an unbounded weight).
DEVIATION_FLOOR_SHARE = 1e-3
EIGEN_FLOOR = 1e-10
# auto keeps the probe when its out-of-fold accuracy beats the vote's by at least this many examples and this share:
# on 2-5 class sets the two are often within a few examples of each other, and the vote is the method's own rule.
AUTO_MARGIN_EXAMPLES = 2
AUTO_MARGIN_SHARE = 0.01
# Temperature and sharpness grids: a coarse log grid, then a finer one around the best point.
TEMPERATURES = np.geomspace(1e-3, 2.0, 34)
SHARPNESS = np.geomspace(0.25, 64.0, 33)
# The probe's temperature is searched relative to its logits' spread (std around each row's mean): a discriminant's
# logits run to thousands, depending on its shrinkage and the head_dim; at T = spread they have unit spread.
RELATIVE_TEMPERATURE_RANGE = (1e-3, 1e3)


def stratified_folds(label_index: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """(N,) fold number of each example: each class's examples shuffled (seeded), then dealt round the folds."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(label_index), dtype=np.int64)
    for label in np.unique(label_index):
        members = rng.permutation(np.flatnonzero(label_index == label))
        assignment[members] = np.arange(len(members)) % folds
    return assignment


def fold_count(label_index: np.ndarray) -> int:
    """FOLDS, or fewer when the smallest class has fewer examples (each class in every fold, train and held out)."""
    return int(min(FOLDS, np.bincount(label_index).min()))


def centroids_without(vectors: np.ndarray, label_index: np.ndarray, classes: int, held_out: np.ndarray) -> np.ndarray:
    """Class means (k, C, D) of the examples outside `held_out` (a boolean mask over N)."""
    kept, labels = vectors[~held_out], label_index[~held_out]
    means = np.stack([kept[labels == label].mean(axis=0) for label in range(classes)])  # (C, k, D)
    return means.transpose(1, 0, 2)


# reselect(training) -> (N, k, D): every example's vectors at the k heads selected from the examples of the boolean
# mask `training` alone, so that a held-out fold is scored as a new item is: by heads and centroids chosen without it.
Reselect = Callable[[np.ndarray], np.ndarray]


def _fold_vectors(vectors: np.ndarray, reselect: Reselect | None, held_out: np.ndarray) -> np.ndarray:
    return vectors if reselect is None else reselect(~held_out)


def out_of_fold_similarities(vectors: np.ndarray, label_index: np.ndarray, classes: int, folds: np.ndarray,
                             reselect: Reselect | None = None) -> np.ndarray:
    """vectors (N, k, D) -> (N, k, C): each example's cosines to centroids computed without its fold (and, with
    `reselect`, at heads selected without it)."""
    similarities = np.empty((len(vectors), vectors.shape[1], classes), dtype=np.float32)
    for fold in np.unique(folds):
        held_out = folds == fold
        fold_vectors = _fold_vectors(vectors, reselect, held_out)
        similarities[held_out] = cosine_to_centroids(fold_vectors[held_out],
                                                     centroids_without(fold_vectors, label_index, classes, held_out))
    return similarities


def log_loss(probs: np.ndarray, label_index: np.ndarray) -> float:
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(label_index)), label_index], 1e-12))))


def _refined(grid: np.ndarray, best: int, points: int = 9) -> np.ndarray:
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    return np.geomspace(low, high, points)


def fit_head_calibration(similarities: np.ndarray, label_index: np.ndarray) -> tuple[float, float]:
    """Temperature and sharpness of the head posteriors minimising the log loss of `similarities` (N, k, C), which
    must come from centroids that did not see the examples (out of fold, or separate calibration data)."""
    def best_sharpness(temperature: float, sharpness_grid: np.ndarray) -> tuple[float, float]:
        per_head = softmax(similarities.astype(np.float64) / temperature).mean(axis=1)  # (N, C)
        logs = np.log(np.maximum(per_head, 1e-12))
        losses = [log_loss(softmax(beta * logs), label_index) for beta in sharpness_grid]
        return float(min(losses)), float(sharpness_grid[int(np.argmin(losses))])

    coarse = [best_sharpness(t, SHARPNESS) for t in TEMPERATURES]
    best = int(np.argmin([loss for loss, _ in coarse]))
    sharpness_grid = _refined(SHARPNESS, int(np.argmin(np.abs(SHARPNESS - coarse[best][1]))))
    fine_temperatures = _refined(TEMPERATURES, best)
    fine = [best_sharpness(t, np.unique(np.concatenate([sharpness_grid, SHARPNESS]))) for t in fine_temperatures]
    index = int(np.argmin([loss for loss, _ in fine]))
    return float(fine_temperatures[index]), fine[index][1]


def fit_temperature(logits: np.ndarray, label_index: np.ndarray) -> float:
    """The temperature T minimising the log loss of softmax(logits / T) over held-out logits (N, C)."""
    spread = float(np.std(logits - logits.mean(axis=1, keepdims=True)))
    grid = (spread if np.isfinite(spread) and spread > 0 else 1.0) * np.geomspace(*RELATIVE_TEMPERATURE_RANGE, 71)
    losses = [log_loss(softmax(logits / t), label_index) for t in grid]
    fine = _refined(grid, int(np.argmin(losses)), 21)
    return float(fine[int(np.argmin([log_loss(softmax(logits / t), label_index) for t in fine]))])


def principal_directions(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rows (N, F) -> (squared singular values (r,), right singular vectors (r, F)) of its non-null directions.

    From the eigendecomposition of the smaller Gram matrix (N x N or F x F) rather than an SVD: LAPACK's divide and
    conquer SVD fails to converge on some of these matrices (seen on all-MiniLM-L6-v2 trec_fine shots), eigh does not.
    Directions whose squared singular value is below EIGEN_FLOOR of the largest are dropped (their vectors, from the
    N x N Gram, would be mostly rounding)."""
    if rows.shape[0] < rows.shape[1]:
        values, vectors = np.linalg.eigh(rows @ rows.T)  # (N,), (N, N)
        kept = values > max(float(values[-1]), 0.0) * EIGEN_FLOOR
        values = values[kept]
        directions = (rows.T @ vectors[:, kept] / np.sqrt(values)).T  # (r, F)
    else:
        values, vectors = np.linalg.eigh(rows.T @ rows)  # (F,), (F, F): every direction, the null ones with value 0
        values, directions = np.maximum(values, 0.0), vectors.T
    return values, directions


def train_probes(features: np.ndarray, label_index: np.ndarray, classes: int,
                 shrinkages: Sequence[float]) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Linear discriminants on features (N, F), one per shrinkage a: {a: (weight (C, F), bias (C,)) float64}.

    With class means mu_c, class shares pi_c, the pooled within-class covariance S = (1/N) sum_i (x_i - mu_y(i))
    (x_i - mu_y(i))^T and its shrunk form S_a = (1 - a) S + a diag(S) (the diagonal floored, DEVIATION_FLOOR_SHARE):
    weight_c = S_a^-1 mu_c, bias_c = -mu_c^T S_a^-1 mu_c / 2 + log pi_c (the Gaussian class posterior's logits).

    Solved in the smaller dimension (N x N when the features outnumber the examples: 5120 features for 20
    Gemma-3-270M heads): with D = diag(S), the standardised deviations Z = (X - M) D^-1/2 = U s V^T give
    D^-1/2 S_a D^-1/2 = V diag((1 - a) s^2 / N + a) V^T + a (I - V V^T), whose inverse is read off the same
    decomposition for every a. Every class needs an example (the folds are stratified: each class is in every
    fold's training part)."""
    counts = np.bincount(label_index, minlength=classes)
    if counts.min() == 0:
        raise BuildError(f"the probe needs examples of every class; class index {int(np.argmin(counts))} has none")
    means = np.stack([features[label_index == label].mean(axis=0) for label in range(classes)])  # (C, F)
    deviations = features - means[label_index]  # (N, F)
    scale = np.sqrt(np.mean(deviations ** 2, axis=0))  # (F,) within-class standard deviation
    # The floor also scales with the features themselves: when the classes' examples are (nearly) identical, the
    # deviations are rounding noise, and a floor relative to them alone would blow the weights up to ~1e40.
    floor = DEVIATION_FLOOR_SHARE * max(float(np.mean(scale)), float(np.sqrt(np.mean(features ** 2))))
    scale = np.maximum(scale, floor if floor > 0 else 1.0)
    variances, directions = principal_directions(deviations / scale)
    variances = variances / len(features)  # (r,) eigenvalues of the standardised covariance
    standard_means = means / scale  # (C, F)
    along = standard_means @ directions.T  # (C, r)
    across = standard_means - along @ directions  # (C, F): the means' part outside the deviations' span
    log_share = np.log(counts / len(features))
    probes = {}
    for shrinkage in shrinkages:
        solved = (along / ((1 - shrinkage) * variances + shrinkage)) @ directions + across / shrinkage  # (C, F)
        probes[shrinkage] = (solved / scale, -0.5 * np.sum(solved * standard_means, axis=1) + log_share)
    return probes


def train_probe(features: np.ndarray, label_index: np.ndarray, classes: int,
                shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """One probe (train_probes with a single shrinkage): weight (C, F), bias (C,)."""
    return train_probes(features, label_index, classes, [shrinkage])[shrinkage]


def out_of_fold_logits(vectors: np.ndarray, label_index: np.ndarray, classes: int, folds: np.ndarray,
                       shrinkages: Sequence[float], reselect: Reselect | None = None) -> dict[float, np.ndarray]:
    """{shrinkage: (N, C) probe logits of each example from a probe trained without its fold} over vectors (N, k, D)
    (and, with `reselect`, at heads selected without the fold)."""
    logits = {shrinkage: np.empty((len(vectors), classes)) for shrinkage in shrinkages}
    for fold in np.unique(folds):
        held_out = folds == fold
        features = probe_features(_fold_vectors(vectors, reselect, held_out))
        probes = train_probes(features[~held_out], label_index[~held_out], classes, shrinkages)
        for shrinkage, (weight, bias) in probes.items():
            logits[shrinkage][held_out] = features[held_out] @ weight.T + bias
    return logits


def calibrated_log_loss(logits: np.ndarray, label_index: np.ndarray) -> tuple[float, float]:
    """(log loss, temperature) of held-out logits (N, C) at their best temperature: a discriminant's raw logits are
    over-confident by an amount that depends on its shrinkage, so shrinkages are compared after temperature."""
    temperature = fit_temperature(logits, label_index)
    return log_loss(softmax(logits / temperature), label_index), temperature


@dataclass
class ScoringFit:
    """What fitting produced: the scoring model and the out-of-fold evidence behind it (recorded in pack metrics)."""

    scoring: Scoring | None  # None: too few examples to fit out of fold; the pack stays format 1
    metrics: dict[str, Any] = field(default_factory=dict)


def fit_scoring(vectors: np.ndarray, label_index: np.ndarray, classes: int, classifier: str = DEFAULT_CLASSIFIER,
                vote_method: str = "majority", head_scores: np.ndarray | None = None, seed: int = 0,
                reselect: Reselect | None = None) -> ScoringFit:
    """Fit the scoring model of a pack on its labelled examples' vectors (N, k, D) of the selected heads. reselect:
    how the heads are chosen from part of the examples (SavClassifier passes its own selection), so that every
    out-of-fold score comes from heads, centroids and probe that never saw the example; None keeps the selected
    heads for every fold."""
    if classifier not in CLASSIFIER_CHOICES:
        raise BuildError(f"classifier {classifier!r} is not one of {list(CLASSIFIER_CHOICES)}")
    counts = np.bincount(label_index, minlength=classes)
    if counts.min() < 2:
        if classifier == "probe":
            raise BuildError(f"the probe is fitted by cross-validation and needs at least 2 examples per class; class "
                             f"index {int(np.argmin(counts))} has {int(counts.min())}")
        return ScoringFit(None, {"calibration": "none: a class has fewer than 2 examples"})
    folds = stratified_folds(label_index, fold_count(label_index), seed)
    similarities = out_of_fold_similarities(vectors, label_index, classes, folds, reselect)
    # The cross-validated vote is the pack's vote rule; "probability" has no vote of its own, so its CV uses majority.
    vote_predictions = vote(similarities, vote_method if vote_method in VOTE_METHODS else "majority",
                            head_scores).predictions
    metrics: dict[str, Any] = {"cv_folds": int(folds.max() + 1),
                               "cv_vote_accuracy": round(float(np.mean(vote_predictions == label_index)), 6)}
    if classifier in ("probe", "auto"):
        features = probe_features(vectors)  # (N, k * D) float64
        by_shrinkage = out_of_fold_logits(vectors, label_index, classes, folds, PROBE_SHRINKAGE_GRID, reselect)
        fitted = {shrinkage: calibrated_log_loss(logits, label_index) for shrinkage, logits in by_shrinkage.items()}
        chosen = min(PROBE_SHRINKAGE_GRID, key=lambda shrinkage: fitted[shrinkage][0])
        probe_correct = int(np.sum(by_shrinkage[chosen].argmax(axis=1) == label_index))
        metrics.update(cv_probe_accuracy=round(probe_correct / len(label_index), 6), probe_shrinkage=chosen)
        vote_correct = int(np.sum(vote_predictions == label_index))
        margin = max(AUTO_MARGIN_EXAMPLES, AUTO_MARGIN_SHARE * len(label_index))
        if classifier == "probe" or probe_correct - vote_correct >= margin:
            weight, bias = train_probe(features, label_index, classes, chosen)
            temperature = fitted[chosen][1]
            return ScoringFit(Scoring("probe", temperature, 1.0, "cross-validation", weight.astype(np.float32),
                                      bias.astype(np.float32)), metrics)
    temperature, sharpness = fit_head_calibration(similarities, label_index)
    return ScoringFit(Scoring("vote", temperature, sharpness, "cross-validation"), metrics)


def recalibrate(scoring: Scoring | None, vectors: np.ndarray, similarities: np.ndarray, label_index: np.ndarray) -> Scoring:
    """The same classifier with its calibration fitted on separate labelled data (vectors (N, k, D) of the pack's
    heads and their cosines (N, k, C) to the pack's centroids): the `--calibration FILE` path. scoring None (a vote
    pack whose shots were too few to fit out of fold) gets a vote scoring model fitted on the data."""
    if scoring is not None and scoring.classifier == "probe":
        logits = probe_logits(vectors, scoring.probe_weight, scoring.probe_bias)  # the runtime's own rule
        return Scoring("probe", fit_temperature(logits, label_index), 1.0, "calibration-data",
                       scoring.probe_weight, scoring.probe_bias)
    temperature, sharpness = fit_head_calibration(similarities, label_index)
    return Scoring("vote", temperature, sharpness, "calibration-data")


__all__ = ["CLASSIFIER_CHOICES", "DEFAULT_CLASSIFIER", "FOLDS", "ScoringFit", "fit_head_calibration", "fit_scoring",
           "fit_temperature", "out_of_fold_logits", "out_of_fold_similarities", "recalibrate",
           "stratified_folds", "train_probe", "train_probes"]
