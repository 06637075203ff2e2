"""From a pack's head vectors to a decision: the label, the vote, calibrated probabilities, abstention.

One implementation for every consumer (builder, runtime, service, Ray, the in-graph scores' reference). The formulas
are docs/format.md section 5:

- vote packs: the label is the heads' vote (`vote.vote`, the SAVs rule); the probabilities are per-head posteriors
  softmax(cos / temperature), averaged over the k heads, then sharpened: p ∝ mean^sharpness.
- probe packs: the label is the argmax of a linear discriminant (weights and bias) over the heads' unit vectors, its
  probabilities softmax(logits / temperature); the vote and shares are still reported.
- format-1 packs carry no scoring model: their probabilities are the vote shares, and the record says
  `"calibrated": false`.

Shapes: B items, k heads, C classes, D = head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import InputError
from .vote import NORM_FLOOR, VOTE_METHODS, Votes, cosine_to_centroids, vote

# The probability floor before a logarithm: mean head posteriors are > 0 in exact arithmetic, not always in float.
PROBABILITY_FLOOR = 1e-12
# Vote methods that decide from the probabilities rather than from the heads' votes: they need a calibrated pack.
PROBABILITY_VOTE = "probability"
DECISION_METHODS = (*VOTE_METHODS, PROBABILITY_VOTE)


@dataclass(frozen=True)
class Scoring:
    """A pack's scoring model (the `savpack.scoring` object and, for a probe, its tensors)."""

    classifier: str  # "vote" | "probe"
    temperature: float
    sharpness: float
    fitted_on: str
    probe_weight: np.ndarray | None = None  # (C, k * D)
    probe_bias: np.ndarray | None = None  # (C,)

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None, probe_weight: np.ndarray | None = None,
                    probe_bias: np.ndarray | None = None) -> "Scoring | None":
        if not record:
            return None
        return cls(record["classifier"], float(record["temperature"]), float(record["sharpness"]), record["fitted_on"],
                   probe_weight, probe_bias)

    def record(self) -> dict[str, Any]:
        return {"classifier": self.classifier, "temperature": self.temperature, "sharpness": self.sharpness,
                "fitted_on": self.fitted_on}


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=axis, keepdims=True)


def head_probabilities(similarities: np.ndarray, temperature: float, sharpness: float) -> np.ndarray:
    """similarities (B, k, C) -> (B, C): mean over heads of softmax(cos / temperature), raised to `sharpness` and
    normalised (= softmax(sharpness * log mean))."""
    per_head = softmax(np.asarray(similarities, dtype=np.float64) / temperature)  # (B, k, C)
    mean = per_head.mean(axis=1)  # (B, C)
    return softmax(sharpness * np.log(np.maximum(mean, PROBABILITY_FLOOR)))


def probe_features(vectors: np.ndarray) -> np.ndarray:
    """vectors (B, k, D) -> (B, k * D) float64: each head's vector at unit length (the norm floored at NORM_FLOOR, as
    `unit` does), concatenated in vote order. In float64, as the graph computes them from the same float32 vectors:
    rounding unit vectors to float32 would move a probe's logits by up to ~1e-6 over thousands of features."""
    vectors = np.asarray(vectors, dtype=np.float64)
    units = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), NORM_FLOOR)
    return units.reshape(units.shape[0], -1)


def probe_logits(vectors: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """vectors (B, k, D), weight (C, k * D), bias (C,) -> logits (B, C)."""
    return probe_features(vectors) @ np.asarray(weight, dtype=np.float64).T + bias


def probabilities(scoring: Scoring, vectors: np.ndarray, similarities: np.ndarray) -> np.ndarray:
    """The calibrated class probabilities (B, C) of a pack's scoring model."""
    if scoring.classifier == "probe":
        return softmax(probe_logits(vectors, scoring.probe_weight, scoring.probe_bias) / scoring.temperature)
    return head_probabilities(similarities, scoring.temperature, scoring.sharpness)


@dataclass(frozen=True)
class Decision:
    """One pack's decision over a batch of B items."""

    predictions: np.ndarray  # (B,) class index of the label (also for abstained items: the label withheld)
    votes: Votes
    probabilities: np.ndarray  # (B, C): calibrated, or the vote shares when `calibrated` is False
    calibrated: bool
    abstained: np.ndarray  # (B,) bool: top probability below the abstention threshold


def check_threshold(abstain_below: Any, name: str = "abstain_below") -> float | None:
    """None, or a probability threshold in [0, 1]; InputError naming `name` otherwise."""
    if abstain_below is None:
        return None
    if isinstance(abstain_below, bool) or not isinstance(abstain_below, (int, float)) \
            or not 0.0 <= float(abstain_below) <= 1.0:
        raise InputError(f"{name} must be a probability from 0 to 1, got {abstain_below!r}")
    return float(abstain_below)


def decide(centroids: np.ndarray, scoring: Scoring | None, vectors: np.ndarray, *, method: str = "majority",
           head_scores: np.ndarray | None = None, abstain_below: float | None = None,
           similarities: np.ndarray | None = None, graph_votes: Votes | None = None,
           graph_probabilities: np.ndarray | None = None) -> Decision:
    """A pack's decision for vectors (B, k, D) of its heads.

    method: the vote ("majority", "cosine", "weighted" by head score) or "probability" (the argmax of the calibrated
    probabilities). The graph's own scores (a bundle's, savpack.export.scores: this module's rules computed in the
    graph) replace the numpy computation when given: similarities (B, k, C) its cosines; graph_votes its vote counts
    with its prediction by `method`; graph_probabilities (B, C) its probabilities of the `scoring` model.
    abstain_below: withhold the label of items whose top probability is below it."""
    if method not in DECISION_METHODS:
        raise InputError(f"vote method {method!r} is not one of {list(DECISION_METHODS)}")
    if similarities is None:
        similarities = cosine_to_centroids(vectors, centroids)
    threshold = check_threshold(abstain_below)
    # With a probability label the graph's `prediction` is that label, not the vote's winner; nothing reads the vote's
    # winner then (the record shows the vote counts).
    votes = graph_votes if graph_votes is not None else \
        vote(similarities, "majority" if method == PROBABILITY_VOTE else method, head_scores)
    if scoring is None:
        if method == PROBABILITY_VOTE:
            raise InputError("vote method 'probability' needs a calibrated pack (format 2); this pack carries no "
                             "calibration (format 1): use the majority vote, or rebuild the pack")
        probs, calibrated, predictions = votes.shares.astype(np.float64), False, votes.predictions
    else:
        probs = probabilities(scoring, vectors, similarities) if graph_probabilities is None \
            else np.asarray(graph_probabilities, dtype=np.float64)
        calibrated = True
        use_probabilities = scoring.classifier == "probe" or method == PROBABILITY_VOTE
        # The graph's prediction is the argmax of its float64 probabilities (it returns them as float32, whose
        # argmax may differ where two agree to float32 rounding).
        by_graph = graph_votes is not None and graph_probabilities is not None
        predictions = votes.predictions if by_graph or not use_probabilities else probs.argmax(axis=1)
    abstained = probs.max(axis=1) < threshold if threshold is not None else np.zeros(len(predictions), dtype=bool)
    return Decision(np.asarray(predictions), votes, probs, calibrated, abstained)


def pack_decision(pack: Any, vectors: np.ndarray, *, method: str | None = None, abstain_below: float | None = None,
                  similarities: np.ndarray | None = None, graph_votes: Votes | None = None,
                  graph_probabilities: np.ndarray | None = None) -> Decision:
    """`decide` with a Pack's centroids, scoring model, head scores and vote method (unless `method` is given). The
    graph's vote is used only for the pack's own method, the one the graph computes."""
    own = pack.selection.get("vote", "majority")
    return decide(pack.centroids, pack.scoring_model, vectors, method=method or own, head_scores=pack.head_scores,
                  abstain_below=abstain_below, similarities=similarities,
                  graph_votes=graph_votes if method in (None, own) else None, graph_probabilities=graph_probabilities)


def scoring_summary(pack: Any) -> str:
    """One line for people: how this pack's probabilities are made."""
    scoring = pack.scoring_model
    if scoring is None:
        return f"none (pack format {pack.format_version}): the probabilities are the vote shares"
    where = "cross-validation over the labelled examples" if scoring.fitted_on == "cross-validation" \
        else "separate calibration data"
    if scoring.classifier == "probe":
        line = f"probe (linear head), temperature {scoring.temperature:.4g}, fitted by {where}"
    else:
        line = f"head posteriors, temperature {scoring.temperature:.4g}, sharpness {scoring.sharpness:.4g}, fitted by {where}"
    return line + _shots_uncertainty(pack, scoring)


def _shots_uncertainty(pack: Any, scoring: Scoring) -> str:
    """How far probabilities fitted on few examples can be off: their confidence follows the accuracy the examples
    show out of fold, an estimate with a binomial standard error (docs/validity.md, "What limits it": off by 0.05 on
    average from 40-120 examples)."""
    accuracy = (pack.metrics or {}).get("cv_probe_accuracy" if scoring.classifier == "probe" else "cv_vote_accuracy")
    # metrics are free-form JSON in the file: anything but a share is not shown rather than trusted
    if scoring.fitted_on != "cross-validation" or isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) \
            or not 0.0 <= accuracy <= 1.0:
        return ""
    examples = int(np.sum(pack.class_counts))
    error = float(np.sqrt(accuracy * (1 - accuracy) / examples))
    return (f" (out-of-fold accuracy {accuracy:.3f} ± {error:.3f} from {examples} examples: the probabilities can be "
            f"off by as much; --calibration FILE fits them on separate labelled data)")


__all__ = ["DECISION_METHODS", "Decision", "Scoring", "check_threshold", "decide", "head_probabilities",
           "pack_decision", "probabilities", "probe_features", "probe_logits", "scoring_summary", "softmax"]
