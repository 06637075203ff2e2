"""SavClassifier: the SAV method as a scikit-learn style estimator over head activations (numpy only).

`fit(X, y)` takes every head's vector at the last token, X (N, layers, heads, head_dim), and string labels y; it
selects k heads and stores their class centroids. Learned attributes end in `_`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from savpack_runtime import Pack
from savpack_runtime.vote import VOTE_METHODS, Votes, classify_vectors

from .errors import BuildError
from .selection import SCORINGS, class_means, head_scores, top_heads

DEFAULT_K = 20


class SavClassifier:
    def __init__(self, k: int | None = DEFAULT_K, scoring: str = "paper", vote: str = "majority"):
        self.k = k  # None: every head votes
        self.scoring = scoring
        self.vote = vote

    def fit(self, X: np.ndarray, y: Sequence[str]) -> "SavClassifier":
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 4:
            raise BuildError(f"X must be (examples, layers, heads, head_dim), got shape {list(X.shape)}")
        if len(y) != X.shape[0]:
            raise BuildError(f"{X.shape[0]} activation rows but {len(y)} labels")
        if self.scoring not in SCORINGS:
            raise BuildError(f"scoring {self.scoring!r} is not one of {SCORINGS}")
        if self.vote not in VOTE_METHODS:
            raise BuildError(f"vote {self.vote!r} is not one of {VOTE_METHODS}")
        self.labels_ = tuple(sorted(set(y)))
        if len(self.labels_) < 2:
            raise BuildError(f"only one class ({self.labels_[0]!r}) in the labelled data; a classifier needs at least 2")
        count, layers, heads, head_dim = X.shape
        k = layers * heads if self.k is None else self.k
        label_index = np.array([self.labels_.index(label) for label in y])
        correct = head_scores(X.reshape(count, layers * heads, head_dim), label_index, len(self.labels_), self.scoring)
        self.all_head_scores_ = (correct / count).reshape(layers, heads).astype(np.float32)  # accuracy of each head
        self.heads_ = top_heads(self.all_head_scores_, k)
        means = class_means(self._select(X), label_index, len(self.labels_))  # (C, k, D)
        self.centroids_ = np.ascontiguousarray(means.transpose(1, 0, 2))  # (k, C, D)
        self.head_scores_ = self.all_head_scores_[self.heads_[:, 0], self.heads_[:, 1]]
        self.class_counts_ = np.bincount(label_index, minlength=len(self.labels_)).astype(np.int32)
        return self

    def _select(self, X: np.ndarray) -> np.ndarray:
        """(N, layers, heads, D) -> (N, k, D): the selected heads' vectors, in vote order."""
        return X[:, self.heads_[:, 0], self.heads_[:, 1]]

    def decide(self, head_vectors: np.ndarray) -> Votes:
        """The vote for vectors of the selected heads only, (N, k, D)."""
        return classify_vectors(head_vectors, self.centroids_, self.vote)

    def predict(self, X: np.ndarray) -> list[str]:
        """Labels for full activations (N, layers, heads, D)."""
        return [self.labels_[i] for i in self.decide(self._select(np.asarray(X, np.float32))).predictions]

    def score(self, X: np.ndarray, y: Sequence[str]) -> float:
        return float(np.mean([p == t for p, t in zip(self.predict(X), y)]))

    # -- packs ---------------------------------------------------------------------------------------------------

    def to_pack(self, model: dict[str, Any], prompt: dict[str, Any], **fields: Any) -> Pack:
        selection = {"k": int(self.heads_.shape[0]), "scoring": self.scoring, "vote": self.vote,
                     "head_score": "labelled-set accuracy", **fields.pop("selection", {})}
        return Pack(
            heads=self.heads_, centroids=self.centroids_, head_scores=self.head_scores_,
            class_counts=self.class_counts_, all_head_scores=self.all_head_scores_, labels=self.labels_,
            model=model, prompt=prompt, selection=selection, **fields,
        )

    @classmethod
    def from_pack(cls, pack: Pack) -> "SavClassifier":
        classifier = cls(k=pack.k, scoring=pack.selection.get("scoring", "paper"), vote=pack.selection.get("vote", "majority"))
        classifier.labels_ = tuple(pack.labels)
        classifier.heads_ = np.asarray(pack.heads)
        classifier.centroids_ = np.asarray(pack.centroids)
        classifier.head_scores_ = np.asarray(pack.head_scores)
        classifier.all_head_scores_ = np.asarray(pack.all_head_scores)
        classifier.class_counts_ = np.asarray(pack.class_counts)
        return classifier
