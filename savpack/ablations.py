"""The SAVs paper's ablations on cached activations: number of heads k, shots per class, in-sample vs leave-one-out
head scoring, majority vs summed-cosine vote, over several seeds.

The model runs once per example (`savpack extract`); every setting and seed then samples its labelled shots from that
pool of activations, so an ablation costs numpy time, not forward passes.

Shapes: B test items, M = layers x heads, C classes, D = head_dim.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from savpack_runtime.vote import VOTE_METHODS, cosine_to_centroids, vote

from .classifier import SavClassifier
from .data import sample_shots
from .errors import BuildError
from .extract import ActivationSet
from .metrics import classification_report
from .selection import SCORINGS

K_VALUES: tuple[int | None, ...] = (1, 5, 10, 20, 40, 100, None)  # None: every head
SHOTS = (5, 10, 20, 50, 100)
SEEDS = (0, 1, 2, 3, 4)
METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


@dataclass(frozen=True)
class Run:
    """One classifier fitted on one seed's shots and scored on the test set."""

    shots: int
    seed: int
    scoring: str
    k: int | None  # None: all heads
    vote: str
    metrics: dict[str, float]


def shots_available(labels: Sequence[str], shots: int) -> bool:
    return min(Counter(labels).values()) >= shots


def sav_ablation(pool: ActivationSet, test: ActivationSet, shots: Iterable[int] = SHOTS,
                 ks: Iterable[int | None] = K_VALUES, scorings: Iterable[str] = SCORINGS,
                 votes: Iterable[str] = VOTE_METHODS, seeds: Iterable[int] = SEEDS) -> list[Run]:
    """Every combination of the settings, each seed drawing `shots` per class from `pool` (shots a class cannot
    supply and k beyond the number of heads are left out). One head ranking per (shots, seed, scoring): the top k
    heads of a ranking are its first k, so every k and vote reuses it."""
    if sorted(set(test.labels) - set(pool.labels)):
        raise BuildError(f"test labels {sorted(set(test.labels) - set(pool.labels))} never occur in the labelled pool")
    ks, scorings, votes, seeds = list(ks), list(scorings), list(votes), list(seeds)
    for method in votes:
        if method not in VOTE_METHODS:
            raise BuildError(f"vote {method!r} is not one of {VOTE_METHODS}")
    _, layers, heads, _ = pool.activations.shape
    runs = []
    for shot_count in shots:
        if not shots_available(pool.labels, shot_count):
            continue
        for seed in seeds:
            train = pool.subset(sample_shots(pool.labels, shot_count, seed)[0])
            for scoring in scorings:
                ranked = SavClassifier(k=None, scoring=scoring, classifier="vote").fit(train.activations, train.labels)
                similarities = cosine_to_centroids(
                    test.activations[:, ranked.heads_[:, 0], ranked.heads_[:, 1]], ranked.centroids_)  # (B, M, C)
                for k in ks:
                    if k is not None and k > layers * heads:
                        continue
                    for method in votes:
                        count = k or layers * heads
                        predicted = vote(similarities[:, :count], method, ranked.head_scores_[:count]).predictions
                        report = classification_report(test.labels, ranked.classes_[predicted], ranked.classes_)
                        runs.append(Run(shot_count, seed, scoring, k, method, {name: report[name] for name in METRICS}))
    return runs


def summarise(runs: Sequence[Run], by: Sequence[str], metric: str = "accuracy") -> list[dict[str, Any]]:
    """Mean and standard deviation (over seeds) of `metric`, one row per distinct value of the fields `by`."""
    groups: dict[tuple, list[float]] = {}
    for run in runs:
        groups.setdefault(tuple(getattr(run, name) for name in by), []).append(run.metrics[metric])
    return [{**dict(zip(by, key)), "mean": float(np.mean(values)), "std": float(np.std(values)), "runs": len(values)}
            for key, values in groups.items()]


def k_name(k: int | None) -> str:
    return "all" if k is None else str(k)
