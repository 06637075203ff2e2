"""Head selection by the SAVs rule, for all heads at once.

Per head: class means over the labelled set; each labelled example is classified by its cosine-nearest class mean;
the head's score is the number it gets right. The top k heads are kept; ties go to the lower layer, then the lower
head. "loo" scoring compares each example with its own class's mean computed without it.

Shapes: N examples, M = layers x heads, C classes, D = head_dim.
"""

from __future__ import annotations

import numpy as np

from savpack_runtime.vote import cosine_to_centroids, unit

from .errors import BuildError

SCORINGS = ("paper", "loo")


def class_sums(vectors: np.ndarray, label_index: np.ndarray, classes: int) -> np.ndarray:
    """vectors (N, M, D), label_index (N,) -> (C, M, D) float64 sum of each class's vectors at each head."""
    # One reduction per class: np.add.at (unbuffered, element by element) took 7.3 s for 320 x 784 heads x 128 where
    # this takes 0.1 s (tools/bench_build.py, head scoring).
    sums = np.zeros((classes,) + vectors.shape[1:], dtype=np.float64)
    for label in range(classes):
        sums[label] = vectors[label_index == label].sum(axis=0, dtype=np.float64)
    return sums


def class_means(vectors: np.ndarray, label_index: np.ndarray, classes: int) -> np.ndarray:
    """vectors (N, M, D), label_index (N,) -> (C, M, D) float32 mean vector of each class at each head."""
    counts = np.bincount(label_index, minlength=classes)
    return (class_sums(vectors, label_index, classes) / counts[:, None, None]).astype(np.float32)


def head_scores(vectors: np.ndarray, label_index: np.ndarray, classes: int, scoring: str = "paper") -> np.ndarray:
    """Number of labelled examples each head classifies correctly by nearest class mean: (N, M, D) -> (M,)."""
    if scoring not in SCORINGS:
        raise BuildError(f"scoring {scoring!r} is not one of {SCORINGS}")
    counts = np.bincount(label_index, minlength=classes)
    if scoring == "loo" and (counts < 2).any():
        lonely = int(np.argmin(counts))
        raise BuildError(
            f"leave-one-out scoring needs at least 2 examples per class; class index {lonely} has {counts[lonely]} "
            "(use --scoring paper, or add examples)"
        )
    sums = class_sums(vectors, label_index, classes)  # (C, M, D)
    means = (sums / counts[:, None, None]).astype(np.float32)
    similarities = cosine_to_centroids(vectors, means.transpose(1, 0, 2))  # (N, M, C)
    if scoring == "loo":
        # The own-class mean without the example points along (class sum - example); cosine ignores the scale.
        own_without = (sums[label_index] - vectors).astype(np.float32)  # (N, M, D)
        own_cosine = np.sum(unit(vectors) * unit(own_without), axis=-1)  # (N, M)
        rows = np.arange(len(label_index))
        similarities[rows, :, label_index] = own_cosine
    predicted = similarities.argmax(axis=-1)  # (N, M)
    return (predicted == label_index[:, None]).sum(axis=0).astype(np.float32)


def top_heads(scores: np.ndarray, k: int) -> np.ndarray:
    """scores (layers, heads) -> (k, 2) int32 (layer, head) of the k best, ties to the lower layer, then head."""
    layers, heads = scores.shape
    if not 1 <= k <= layers * heads:
        raise BuildError(f"k = {k} heads requested, but the model has {layers} x {heads} = {layers * heads}")
    flat = scores.reshape(-1)
    # Stable sort on descending score keeps ascending (layer, head) order among equal scores.
    best = np.argsort(-flat, kind="stable")[:k]
    return np.stack([best // heads, best % heads], axis=1).astype(np.int32)
