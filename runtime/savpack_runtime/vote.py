"""Cosine nearest-centroid per head, and the vote of the heads. Used by the runtime and by the builder's selection.

Shapes: B items, k heads, C classes, D = head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Zero vectors (e.g. a head that is silent at the last token) have no direction; dividing by this floor instead of
# their zero norm makes their cosine 0 against everything rather than NaN.
NORM_FLOOR = 1e-8
VOTE_METHODS = ("majority", "cosine", "weighted")


def unit(vectors: np.ndarray) -> np.ndarray:
    """Scale each vector along the last axis to length 1 (zero vectors stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), NORM_FLOOR)


def cosine_to_centroids(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cosine similarity of each item's head vector to each class centroid of that head.

    vectors (B, k, D), centroids (k, C, D) -> (B, k, C)
    """
    per_head = np.matmul(unit(vectors).transpose(1, 0, 2), unit(centroids).transpose(0, 2, 1))  # (k, B, C)
    return per_head.transpose(1, 0, 2)


@dataclass(frozen=True)
class Votes:
    predictions: np.ndarray  # (B,) class index
    votes: np.ndarray  # (B, C) heads voting for each class
    shares: np.ndarray  # (B, C) votes / k
    cosine_sums: np.ndarray  # (B, C) summed cosine over heads
    head_choices: np.ndarray  # (B, k) class each head voted for


def vote(similarities: np.ndarray, method: str = "majority", head_scores: np.ndarray | None = None) -> Votes:
    """Each head votes for its most similar centroid; the class with most votes wins.

    similarities (B, k, C). "majority": ties between classes with equally many votes go to the one with the larger
    cosine summed over all heads, then to the lower class index. "cosine": the largest summed cosine wins outright.
    "weighted": each head's vote counts its selection score (head_scores (k,), the labelled-set accuracy); ties as
    for "majority". `votes` and `shares` are always the plain head counts.
    """
    if method not in VOTE_METHODS:
        raise ValueError(f"vote method {method!r} is not one of {VOTE_METHODS}")
    batch, k, classes = similarities.shape
    head_choices = similarities.argmax(axis=-1)  # (B, k)
    votes = np.zeros((batch, classes), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(batch), k), head_choices.reshape(-1)), 1)
    cosine_sums = similarities.sum(axis=1, dtype=np.float64)  # (B, C)
    if method in ("majority", "weighted"):
        tally = votes if method == "majority" else _weighted_votes(head_choices, classes, head_scores)
        tied = tally == tally.max(axis=1, keepdims=True)
        predictions = np.where(tied, cosine_sums, -np.inf).argmax(axis=1)
    else:
        predictions = cosine_sums.argmax(axis=1)
    return Votes(predictions, votes, votes / k, cosine_sums, head_choices)


def _weighted_votes(head_choices: np.ndarray, classes: int, head_scores: np.ndarray | None) -> np.ndarray:
    """head_choices (B, k), head_scores (k,) -> (B, C) summed score of the heads voting for each class."""
    if head_scores is None or len(head_scores) != head_choices.shape[1]:
        raise ValueError("the weighted vote needs one score per head")
    weights = np.asarray(head_scores, dtype=np.float64)
    tally = np.zeros((head_choices.shape[0], classes), dtype=np.float64)
    for head in range(head_choices.shape[1]):
        tally[np.arange(head_choices.shape[0]), head_choices[:, head]] += weights[head]
    return tally


def classify_vectors(vectors: np.ndarray, centroids: np.ndarray, method: str = "majority",
                     head_scores: np.ndarray | None = None) -> Votes:
    """vectors (B, k, D) of a pack's heads, centroids (k, C, D) of the pack -> the vote."""
    return vote(cosine_to_centroids(vectors, centroids), method, head_scores)
