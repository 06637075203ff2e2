"""SavClassifier: the SAV method as a scikit-learn estimator over head activations (numpy only).

`fit(X, y)` takes every head's output at the classified token and the labels; it scores every head, keeps the k best,
stores their class centroids and fits the scoring model out of fold (savpack.calibration: calibrated probabilities,
and the linear head where `classifier` asks for it or cross-validation prefers it). X is 2-D, (examples, layers * heads * head_dim) with `grid=(layers, heads,
head_dim)` saying how the columns split into heads (grid=None: the columns are one head); for convenience X may also
be 4-D, (examples, layers, heads, head_dim), as `savpack extract` stores activations. Learned attributes end in `_`.

scikit-learn is not a dependency: the estimator follows its conventions (get_params/set_params, classes_,
n_features_in_, NotFittedError, ValueError on bad input) and `sklearn.utils.estimator_checks.check_estimator`
passes on it (tests/test_classifier_sklearn.py); where scikit-learn is installed, its own exception and warning
classes are raised, so its tools and `except` clauses recognise them.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import numpy as np

from savpack_runtime import Pack
from savpack_runtime.errors import SavpackWarning
from savpack_runtime.scoring import DECISION_METHODS, Decision, decide
from savpack_runtime.vote import cosine_to_centroids

from .calibration import CLASSIFIER_CHOICES, DEFAULT_CLASSIFIER, fit_scoring, recalibrate
from .errors import BuildError
from .selection import SCORINGS, class_means, head_scores, top_heads

DEFAULT_K = 20


class SavClassifier:
    """Select the k attention heads whose class centroids classify the labelled set best; predict by their vote.

    k: heads that vote (None: every head). scoring: "paper" (in-sample nearest-centroid accuracy) or "loo"
    (leave-one-out). vote: "majority", "cosine", "weighted" or "probability" (docs/format.md section 5).
    classifier: "vote", "probe" (a linear head over the heads) or "auto" (the better by cross-validation on the
    labelled examples). grid: (layers, heads, head_dim) of 2-D X's columns, None for one head of all columns (4-D X
    carries its grid). random_state: seeds the cross-validation folds.
    """

    def __init__(self, k: int | None = DEFAULT_K, scoring: str = "paper", vote: str = "majority",
                 grid: tuple[int, int, int] | None = None, classifier: str = DEFAULT_CLASSIFIER, random_state: int = 0):
        self.k = k
        self.scoring = scoring
        self.vote = vote
        self.grid = grid
        self.classifier = classifier
        self.random_state = random_state

    # -- scikit-learn's estimator protocol ----------------------------------------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _parameter_names(type(self))}

    def set_params(self, **params: Any) -> "SavClassifier":
        valid = _parameter_names(type(self))
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"Invalid parameter {name!r} for estimator {type(self).__name__}; valid: {list(valid)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {name: parameter.default for name, parameter in inspect.signature(type(self)).parameters.items()}
        changed = [f"{name}={value!r}" for name, value in self.get_params().items() if value != defaults[name]]
        return f"{type(self).__name__}({', '.join(changed)})"

    def __sklearn_tags__(self) -> Any:
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags  # only scikit-learn itself asks

        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True),
                    classifier_tags=ClassifierTags(), input_tags=InputTags())

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "heads_")

    # -- learning and predicting ----------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any) -> "SavClassifier":
        """X (N, layers * heads * head_dim) or (N, layers, heads, head_dim); y (N,) labels. Returns self."""
        if self.scoring not in SCORINGS:
            raise BuildError(f"scoring {self.scoring!r} is not one of {SCORINGS}")
        if self.vote not in DECISION_METHODS:
            raise BuildError(f"vote {self.vote!r} is not one of {DECISION_METHODS}")
        if self.classifier not in CLASSIFIER_CHOICES:
            raise BuildError(f"classifier {self.classifier!r} is not one of {CLASSIFIER_CHOICES}")
        activations, grid, features = self._activations(X, fitting=True)
        labels = _labels(y, len(activations))
        self.classes_, label_index = np.unique(labels, return_inverse=True)
        if len(self.classes_) < 2:
            raise BuildError(f"only one class ({self.classes_[0]!r}) in the labelled data; a classifier needs at least 2")
        self.n_features_in_, self.grid_ = features, grid
        count, layers, heads, head_dim = activations.shape
        k = layers * heads if self.k is None else self.k
        correct = head_scores(activations.reshape(count, layers * heads, head_dim), label_index, len(self.classes_),
                              self.scoring)
        self.all_head_scores_ = (correct / count).reshape(layers, heads).astype(np.float32)  # accuracy of each head
        self.heads_ = top_heads(self.all_head_scores_, k)
        means = class_means(self._select(activations), label_index, len(self.classes_))  # (C, k, D)
        self.centroids_ = np.ascontiguousarray(means.transpose(1, 0, 2))  # (k, C, D)
        self.head_scores_ = self.all_head_scores_[self.heads_[:, 0], self.heads_[:, 1]]
        self.class_counts_ = np.bincount(label_index, minlength=len(self.classes_)).astype(np.int32)
        fitted = fit_scoring(self._select(activations), label_index, len(self.classes_), self.classifier,
                             self.vote, self.head_scores_, self.random_state,
                             reselect=self._reselection(activations, label_index, k))
        self.scoring_, self.cv_metrics_ = fitted.scoring, fitted.metrics
        if self.scoring_ is None and self.vote == "probability":
            raise BuildError("vote 'probability' needs calibrated probabilities, fitted out of fold: at least 2 "
                             "examples per class")
        return self

    def _reselection(self, activations: np.ndarray, label_index: np.ndarray, k: int):
        """The head selection of `fit` on part of the examples, for the out-of-fold fitting (calibration.Reselect):
        a boolean mask over the examples -> every example's vectors at the k heads those examples select. A part
        too small for leave-one-out scoring (a class with one example in it) is scored in-sample instead."""
        count, layers, heads, head_dim = activations.shape
        flat, classes = activations.reshape(count, layers * heads, head_dim), len(self.classes_)

        def reselect(training: np.ndarray) -> np.ndarray:
            part = label_index[training]
            scoring = self.scoring if np.bincount(part, minlength=classes).min() >= 2 else "paper"
            correct = head_scores(flat[training], part, classes, scoring)
            chosen = top_heads((correct / len(part)).reshape(layers, heads), k)
            return activations[:, chosen[:, 0], chosen[:, 1]]  # (N, k, D)

        return reselect

    def calibrate(self, X: Any, y: Any) -> "SavClassifier":
        """Refit the probabilities' calibration on separate labelled data (not the examples fitted on); the heads,
        centroids and classifier stay. Returns self."""
        activations, _, _ = self._activations(X, fitting=False)
        labels = _labels(y, len(activations))
        unknown = sorted(set(labels.tolist()) - set(self.classes_.tolist()))
        if unknown:
            raise BuildError(f"calibration labels {unknown} are not among the classes {self.classes_.tolist()}")
        vectors = self._select(activations)
        position = {label: index for index, label in enumerate(self.classes_.tolist())}
        label_index = np.array([position[label] for label in labels.tolist()], dtype=np.int64)
        self.scoring_ = recalibrate(self.scoring_, vectors, cosine_to_centroids(vectors, self.centroids_), label_index)
        return self

    def decide(self, head_vectors: np.ndarray, abstain_below: float | None = None) -> Decision:
        """The decision (label, vote, probabilities) for vectors of the selected heads only, (N, k, D)."""
        return decide(self.centroids_, self.scoring_, head_vectors, method=self.vote, head_scores=self.head_scores_,
                      abstain_below=abstain_below)

    def head_vectors(self, X: Any) -> np.ndarray:
        """The selected heads' vectors (N, k, D) of X shaped as in fit: what `decide` takes."""
        activations, _, _ = self._activations(X, fitting=False)
        return self._select(activations)

    def predict(self, X: Any) -> np.ndarray:
        """Labels (N,), one of classes_ each, for X shaped as in fit."""
        predictions = self.decide(self.head_vectors(X)).predictions  # before classes_: NotFittedError, not AttributeError
        return self.classes_[predictions]

    def predict_proba(self, X: Any) -> np.ndarray:
        """(N, C) probabilities in the order of classes_: calibrated out of fold (or on calibration data); the vote
        shares where there were too few examples per class to calibrate (calibrated_ is then False)."""
        return self.decide(self.head_vectors(X)).probabilities

    @property
    def calibrated_(self) -> bool:
        if not self.__sklearn_is_fitted__():
            raise _not_fitted(f"This {type(self).__name__} instance is not fitted yet; call fit first")
        return self.scoring_ is not None

    def score(self, X: Any, y: Any) -> float:
        """Accuracy of predict(X) against y."""
        predicted = self.predict(X)
        return float(np.mean(predicted == _labels(y, len(predicted))))

    # -- packs ---------------------------------------------------------------------------------------------------

    def to_pack(self, model: dict[str, Any], prompt: dict[str, Any], **fields: Any) -> Pack:
        selection = {"k": int(self.heads_.shape[0]), "scoring": self.scoring, "vote": self.vote,
                     "classifier": self.classifier, "head_score": "labelled-set accuracy", **fields.pop("selection", {})}
        metrics = {**fields.pop("metrics", {}), **self.cv_metrics_}
        scoring = self.scoring_
        return Pack(
            heads=self.heads_, centroids=self.centroids_, head_scores=self.head_scores_,
            class_counts=self.class_counts_, all_head_scores=self.all_head_scores_,
            labels=tuple(str(label) for label in self.classes_), model=model, prompt=prompt, selection=selection,
            metrics=metrics, scoring=scoring.record() if scoring else None,
            probe_weight=scoring.probe_weight if scoring else None, probe_bias=scoring.probe_bias if scoring else None,
            **fields,
        )

    @classmethod
    def from_pack(cls, pack: Pack) -> "SavClassifier":
        classifier = cls(k=pack.k, scoring=pack.selection.get("scoring", "paper"),
                         vote=pack.selection.get("vote", "majority"), grid=pack.grid,
                         classifier=pack.selection.get("classifier", pack.classifier))
        classifier.classes_ = np.array(pack.labels)
        classifier.grid_ = pack.grid
        classifier.n_features_in_ = int(np.prod(pack.grid))
        classifier.heads_ = np.asarray(pack.heads)
        classifier.centroids_ = np.asarray(pack.centroids)
        classifier.head_scores_ = np.asarray(pack.head_scores)
        classifier.all_head_scores_ = np.asarray(pack.all_head_scores)
        classifier.class_counts_ = np.asarray(pack.class_counts)
        classifier.scoring_ = pack.scoring_model
        classifier.cv_metrics_ = {key: value for key, value in pack.metrics.items() if key.startswith("cv_")}
        return classifier

    # -- input checks --------------------------------------------------------------------------------------------

    def _select(self, activations: np.ndarray) -> np.ndarray:
        """(N, layers, heads, D) -> (N, k, D): the selected heads' vectors, in vote order."""
        return activations[:, self.heads_[:, 0], self.heads_[:, 1]]

    def _activations(self, X: Any, fitting: bool) -> tuple[np.ndarray, tuple[int, int, int], int]:
        """X as float32 (N, layers, heads, head_dim), its grid and its feature count; ValueError (or scikit-learn's
        NotFittedError before fit) naming what is wrong."""
        name = type(self).__name__
        if not fitting and not self.__sklearn_is_fitted__():
            raise _not_fitted(f"This {name} instance is not fitted yet; call fit first")
        if hasattr(X, "toarray") or type(X).__module__.startswith("scipy.sparse"):
            raise TypeError(f"{name} does not take sparse input: head activations are dense; pass X.toarray()")
        array = np.asarray(X)
        if np.iscomplexobj(array):
            raise BuildError("Complex data not supported: head activations are real numbers")
        array = np.asarray(array, dtype=np.float32)
        if array.ndim not in (2, 4):
            raise BuildError(f"X must be 2-D (examples, layers * heads * head_dim) or 4-D (examples, layers, heads, "
                             f"head_dim), got shape {list(array.shape)}. Reshape your data: one example is X.reshape(1, -1)")
        if array.shape[0] == 0:
            raise BuildError(f"X has 0 samples (shape {list(array.shape)}); at least 1 is required")
        if not np.isfinite(array).all():
            raise BuildError("X holds NaN or infinity; head activations must be finite numbers")
        features = int(np.prod(array.shape[1:]))
        if not fitting and features != self.n_features_in_:
            raise BuildError(f"X has {features} features, but {name} is expecting {self.n_features_in_} features as input")
        if features == 0:
            raise BuildError(f"X has 0 feature(s) (shape={array.shape}) while a minimum of 1 is required.")
        grid = self._grid(array) if fitting else self.grid_
        return array.reshape(array.shape[0], *grid), grid, features

    def _grid(self, array: np.ndarray) -> tuple[int, int, int]:
        if array.ndim == 4:
            if self.grid is not None and tuple(self.grid) != array.shape[1:]:
                raise BuildError(f"grid {tuple(self.grid)} differs from 4-D X's {array.shape[1:]}")
            return tuple(int(size) for size in array.shape[1:])
        if self.grid is None:
            return 1, 1, array.shape[1]  # every column belongs to one head
        grid = tuple(int(size) for size in self.grid)
        if len(grid) != 3 or min(grid) < 1 or int(np.prod(grid)) != array.shape[1]:
            raise BuildError(f"grid {self.grid} must be (layers, heads, head_dim) whose product is X's "
                             f"{array.shape[1]} columns")
        return grid


def _parameter_names(cls: type) -> tuple[str, ...]:
    return tuple(name for name in inspect.signature(cls).parameters)


def _labels(y: Any, count: int | None) -> np.ndarray:
    """y as a 1-D array of class labels (strings or integers), checked against X's length when `count` is given."""
    if y is None:
        raise BuildError("SavClassifier requires y to be passed, but the target y is None")
    labels = np.asarray(y)
    if labels.ndim == 2 and labels.shape[1] == 1:
        warnings.warn("A column-vector y was passed when a 1d array was expected; it is flattened",
                      _data_conversion_warning(), stacklevel=3)
        labels = labels.ravel()
    if labels.ndim != 1:
        raise BuildError(f"y should be a 1d array of labels, got shape {list(labels.shape)}")
    if np.iscomplexobj(labels):
        raise BuildError("Complex data not supported: labels are class names or integers")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            raise BuildError("Unknown label type: continuous values; a classifier takes class labels (strings or integers)")
    if count is not None and len(labels) != count:
        raise BuildError(f"{count} activation rows but {len(labels)} labels")
    return labels


def _not_fitted(message: str) -> Exception:
    """scikit-learn's NotFittedError where it is installed (its tools check for it), else the same kind of error."""
    try:
        from sklearn.exceptions import NotFittedError
    except ImportError:
        return _NotFittedError(message)
    return NotFittedError(message)


def _data_conversion_warning() -> type[Warning]:
    """scikit-learn's DataConversionWarning where it is installed, else savpack's warning class."""
    try:
        from sklearn.exceptions import DataConversionWarning
    except ImportError:
        return SavpackWarning
    return DataConversionWarning


class _NotFittedError(BuildError, AttributeError):
    """Used before fit where scikit-learn is not installed (a ValueError and an AttributeError, as scikit-learn's)."""
