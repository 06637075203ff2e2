"""Baselines beside SAVs, on the same examples, prompt and single forward pass (one pass gives every head's vector
and the final hidden state at the pack's token; the zero-shot logits are the LM head applied to that state).

- zero_shot: the model's next-token probabilities over the label words (verbalisers), softmax over those words;
- knn_1, knn_5: cosine k-nearest neighbours on the final hidden state;
- linear_probe: multinomial logistic regression on the standardised final hidden state;
- best_2_layers: layers instead of heads: each layer's heads concatenated into one vector, layers scored and voting
  exactly as heads are (SavClassifier on a grid of layers x 1 "head");
- all_heads: every head votes (SAVs with k = all).

Shapes: N labelled examples, B items, C classes, H hidden size.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from savpack_runtime import format as fmt
from savpack_runtime.scoring import PROBABILITY_VOTE, pack_decision
from savpack_runtime.vote import unit

from .classifier import SavClassifier
from .errors import BuildError
from .extract import ActivationSet
from .metrics import calibration_report, classification_report

KNN_NEIGHBOURS = (1, 5)
BEST_LAYERS = 2
TRAINED_BASELINES = ("knn_1", "knn_5", "linear_probe", "best_2_layers", "all_heads")
BASELINES = ("zero_shot",) + TRAINED_BASELINES


def label_indices(labels: Sequence[str], y: Sequence[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    unknown = next((label for label in y if label not in index), None)
    if unknown is not None:
        raise BuildError(f"label {unknown!r} is not one of the known labels {list(labels)}")
    return np.array([index[label] for label in y], dtype=np.int64)


# -- kNN ------------------------------------------------------------------------------------------------------------


def knn_predict(train: np.ndarray, train_index: np.ndarray, test: np.ndarray, k: int, classes: int) -> np.ndarray:
    """Cosine k-nearest-neighbour vote. train (N, H), train_index (N,), test (B, H) -> (B,) class index.

    Neighbours are the k most cosine-similar training vectors (equal similarities: the lower training index first);
    the class with most neighbours wins, ties going to the class whose tied neighbours' similarities sum higher,
    then to the lower class index.
    """
    if not 1 <= k <= len(train):
        raise BuildError(f"kNN with k = {k} needs at least {k} labelled examples, got {len(train)}")
    similarities = unit(test) @ unit(train).T  # (B, N)
    nearest = np.argsort(-similarities, axis=1, kind="stable")[:, :k]  # (B, k)
    rows = np.repeat(np.arange(len(test)), k)
    neighbour_classes = train_index[nearest].reshape(-1)
    votes = np.zeros((len(test), classes), dtype=np.int64)
    np.add.at(votes, (rows, neighbour_classes), 1)
    summed = np.zeros((len(test), classes), dtype=np.float64)
    np.add.at(summed, (rows, neighbour_classes), np.take_along_axis(similarities, nearest, axis=1).reshape(-1))
    tied = votes == votes.max(axis=1, keepdims=True)
    return np.where(tied, summed, -np.inf).argmax(axis=1)


# -- linear probe ---------------------------------------------------------------------------------------------------


class LinearProbe:
    """Multinomial logistic regression (scikit-learn conventions), fitted by L-BFGS in numpy float64.

    Features are standardised with the training mean and deviation. The objective is scikit-learn's default
    (C = 1): summed cross-entropy + ||W||^2 / 2, here divided by N. It is not tuned.
    (numpy rather than torch.optim: the first torch optimiser imports torch._dynamo, seconds of start-up.)
    """

    def __init__(self, c: float = 1.0, max_iter: int = 300, tolerance: float = 1e-6):
        self.c = c
        self.max_iter = max_iter
        self.tolerance = tolerance

    def fit(self, X: np.ndarray, y: Sequence[str]) -> "LinearProbe":
        X = np.asarray(X, dtype=np.float64)
        self.labels_ = tuple(sorted(set(y)))
        if len(self.labels_) < 2:
            raise BuildError("the linear probe needs at least 2 classes")
        count, width = X.shape
        classes = len(self.labels_)
        self.mean_ = X.mean(axis=0)
        deviation = X.std(axis=0)
        self.scale_ = np.where(deviation > 1e-12, deviation, 1.0)
        features = np.hstack([(X - self.mean_) / self.scale_, np.ones((count, 1))])  # last column: the bias
        targets = np.eye(classes)[label_indices(self.labels_, y)]  # (N, C)
        penalised = np.ones((width + 1, 1))
        penalised[-1] = 0.0  # the intercept is not penalised
        strength = 1.0 / (self.c * count)

        def loss_and_gradient(flat: np.ndarray) -> tuple[float, np.ndarray]:
            weights = flat.reshape(width + 1, classes)
            logits = features @ weights
            logits -= logits.max(axis=1, keepdims=True)
            log_probabilities = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            loss = -(targets * log_probabilities).sum() / count + 0.5 * strength * ((weights * penalised) ** 2).sum()
            gradient = features.T @ (np.exp(log_probabilities) - targets) / count + strength * weights * penalised
            return float(loss), gradient.reshape(-1)

        solution = _minimise_lbfgs(loss_and_gradient, np.zeros((width + 1) * classes), self.max_iter, self.tolerance)
        weights = solution.reshape(width + 1, classes)
        self.coef_, self.intercept_ = weights[:-1], weights[-1]  # (H, C) on standardised features, (C,)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, np.float64) - self.mean_) / self.scale_) @ self.coef_ + self.intercept_

    def predict(self, X: np.ndarray) -> list[str]:
        return [self.labels_[i] for i in self.decision_function(X).argmax(axis=1)]


def _minimise_lbfgs(function, start: np.ndarray, max_iter: int, tolerance: float, memory: int = 10) -> np.ndarray:
    """L-BFGS (two-loop recursion, backtracking Armijo line search) for a smooth convex `function(x) -> (f, grad)`."""
    point = start
    value, gradient = function(point)
    steps: list[tuple[np.ndarray, np.ndarray, float]] = []  # (s, y, 1 / y.s)
    for _ in range(max_iter):
        if np.abs(gradient).max() <= tolerance:
            break
        direction = -gradient
        alphas = []
        for s, y, rho in reversed(steps):
            alpha = rho * (s @ direction)
            direction = direction - alpha * y
            alphas.append(alpha)
        if steps:
            s, y, _ = steps[-1]
            direction = direction * ((s @ y) / (y @ y))
        for (s, y, rho), alpha in zip(steps, reversed(alphas)):
            direction = direction + s * (alpha - rho * (y @ direction))
        slope = gradient @ direction
        if slope >= 0:  # not a descent direction: restart from the gradient
            steps.clear()
            direction, slope = -gradient, -(gradient @ gradient)
        step = 1.0
        while True:
            candidate = point + step * direction
            candidate_value, candidate_gradient = function(candidate)
            if candidate_value <= value + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        s, y = candidate - point, candidate_gradient - gradient
        if s @ y > 1e-12:
            steps.append((s, y, 1.0 / (s @ y)))
            steps = steps[-memory:]
        converged = abs(value - candidate_value) <= 1e-12 * max(1.0, abs(value))
        point, value, gradient = candidate, candidate_value, candidate_gradient
        if converged:
            break
    return point


# -- layers instead of heads ----------------------------------------------------------------------------------------


def layer_vectors(activations: np.ndarray) -> np.ndarray:
    """(N, layers, heads, D) -> (N, layers, 1, heads * D): each layer's heads concatenated, one "head" per layer."""
    count, layers, heads, head_dim = activations.shape
    return activations.reshape(count, layers, 1, heads * head_dim)


class LayerClassifier:
    """The SAV rule with layers as the unit: score each layer (all its heads concatenated) by nearest-centroid
    accuracy on the labelled set, keep the best `n_layers`, and let them vote."""

    def __init__(self, n_layers: int = BEST_LAYERS, scoring: str = "paper", vote: str = "majority"):
        self.n_layers = n_layers
        self.scoring = scoring
        self.vote = vote

    def fit(self, X: np.ndarray, y: Sequence[str]) -> "LayerClassifier":
        self.inner_ = SavClassifier(k=self.n_layers, scoring=self.scoring, vote=self.vote, classifier="vote").fit(layer_vectors(X), y)
        self.layers_ = self.inner_.heads_[:, 0].copy()
        self.layer_scores_ = self.inner_.all_head_scores_[:, 0].copy()
        self.classes_ = self.inner_.classes_
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.inner_.predict(layer_vectors(np.asarray(X, np.float32)))


# -- zero-shot ------------------------------------------------------------------------------------------------------


def verbaliser_words(labels: Sequence[str], verbalisers: Mapping[str, str] | None = None) -> list[str]:
    """The word standing for each label: the user's verbaliser, else the label name itself."""
    verbalisers = dict(verbalisers or {})
    unknown = sorted(set(verbalisers) - set(labels))
    if unknown:
        raise BuildError(f"verbalisers given for {unknown}, which are not labels of the pack ({list(labels)})")
    return [verbalisers.get(label, label) for label in labels]


def verbaliser_token_ids(tokenizer: Any, words: Sequence[str], rendered_template: str) -> np.ndarray:
    """The first token of each word as the model would write it right after the prompt: (C,) token ids.

    The prompt's fixed tail (after `{text}`) is tokenised with and without the word; the word's first token is the
    first id past the tail. A tail that does not end in whitespace is followed by a space, as in "Sentiment: great".
    """
    tail = rendered_template.rsplit(fmt.TEXT_PLACEHOLDER, 1)[-1]
    ids = []
    for word in words:
        spaced = word if not tail or tail[-1].isspace() else " " + word
        tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        full_ids = tokenizer(tail + spaced, add_special_tokens=False)["input_ids"]
        if full_ids[: len(tail_ids)] == tail_ids and len(full_ids) > len(tail_ids):
            ids.append(full_ids[len(tail_ids)])
        else:  # the word merged with the tail's last token: take it on its own
            ids.append(tokenizer((" " + word) if tail else word, add_special_tokens=False)["input_ids"][0])
    by_id: dict[int, list[str]] = {}
    for word, token in zip(words, ids):
        by_id.setdefault(token, []).append(word)
    clash = next((group for group in by_id.values() if len(group) > 1), None)
    if clash:
        raise BuildError(f"label words {clash} start with the same token; give distinct verbalisers (--verbalizer LABEL=WORD)")
    return np.array(ids, dtype=np.int64)


def label_word_logits(model: Any, final_hidden: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """The LM head's logits for the label words only: final_hidden (B, H) -> (B, C).

    Equal to the model's full forward logits at that position (tests check), with only C rows of the head computed:
    the weight rows of the output embedding, its bias if any, and Gemma's final logit soft-capping.
    """
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise BuildError(f"{type(model).__name__} has no language-model head, so it has no zero-shot next-token baseline")
    rows = torch.as_tensor(token_ids, device=head.weight.device)
    weight = head.weight[rows].float()  # (C, H)
    hidden = torch.as_tensor(final_hidden, dtype=torch.float32, device=weight.device)
    logits = hidden @ weight.T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[rows].float()
    cap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.cpu().numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


# -- all together ---------------------------------------------------------------------------------------------------


def _require_hidden(activations: ActivationSet, role: str) -> np.ndarray:
    if activations.final_hidden is None:
        raise BuildError(f"the {role} activations lack the final hidden state; extract them with `savpack extract --hidden`")
    return activations.final_hidden


def baseline_predictions(train: ActivationSet | None, test: ActivationSet, scoring: str = "paper",
                         vote: str = "majority", zero_shot_logits: np.ndarray | None = None,
                         methods: Sequence[str] = BASELINES, labels: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Predicted labels of each baseline in `methods` on `test`, trained on `train`. zero_shot needs its logits
    (B, C) over `labels` (default: the training labels sorted) and is skipped without them; the trained baselines
    are skipped without `train`."""
    if labels is None:
        if train is None:
            raise BuildError("baseline_predictions needs the labels when there is no training data")
        labels = sorted(set(train.labels))
    labels = tuple(labels)
    predictions: dict[str, list[str]] = {}
    if "zero_shot" in methods and zero_shot_logits is not None:
        predictions["zero_shot"] = [labels[i] for i in np.asarray(zero_shot_logits).argmax(axis=1)]
    if train is None:
        return predictions
    needs_hidden = {"knn_1", "knn_5", "linear_probe"} & set(methods)
    if needs_hidden:
        train_hidden, test_hidden = _require_hidden(train, "training"), _require_hidden(test, "test")
        train_index = label_indices(labels, train.labels)
        for k in KNN_NEIGHBOURS:
            if f"knn_{k}" in methods:
                chosen = knn_predict(train_hidden, train_index, test_hidden, k, len(labels))
                predictions[f"knn_{k}"] = [labels[i] for i in chosen]
        if "linear_probe" in methods:
            predictions["linear_probe"] = LinearProbe().fit(train_hidden, train.labels).predict(test_hidden)
    if "best_2_layers" in methods:
        layers = LayerClassifier(BEST_LAYERS, scoring, _vote_rule(vote)).fit(train.activations, train.labels)
        predictions["best_2_layers"] = layers.predict(test.activations)
    if "all_heads" in methods:
        every_head = SavClassifier(k=None, scoring=scoring, vote=_vote_rule(vote), classifier="vote").fit(train.activations, train.labels)
        predictions["all_heads"] = every_head.predict(test.activations)
    return predictions


def _vote_rule(method: str) -> str:
    """The heads' vote a baseline of heads uses: the pack's, except "probability", which needs a fitted scoring
    model the baselines do not have (they vote by majority)."""
    return "majority" if method == PROBABILITY_VOTE else method


def reports(truth: Sequence[str], predictions: Mapping[str, Sequence[str]], labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {name: classification_report(truth, predicted, labels) for name, predicted in predictions.items()}


# -- `savpack eval --baselines` -------------------------------------------------------------------------------------


def check_training_activations(train: ActivationSet, pack: Any, model: dict[str, Any]) -> None:
    """Baselines must learn from activations of the same model, prompt, token and labels as the pack."""
    if set(train.labels) != set(pack.labels):
        raise BuildError(f"the training data's labels {sorted(set(train.labels))} differ from the pack's {list(pack.labels)}")
    if train.model.get("fingerprint") != model.get("fingerprint"):
        raise BuildError(f"the training activations come from another model ({train.model.get('id')}) than {model.get('id')}")
    for field, theirs, ours in (("template", train.prompt.get("template"), pack.prompt.get("template")),
                                (fmt.PROMPT_TOKEN_POSITION, train.token_position, pack.token_position)):
        if theirs != ours:
            raise BuildError(f"the training activations were extracted with prompt {field} {theirs!r}, the pack with {ours!r}")


def evaluate_with_baselines(loaded: Any, pack: Any, examples: Sequence[Any], train: ActivationSet | None = None,
                            verbalisers: Mapping[str, str] | None = None, batch_size: int = 8,
                            vote: str | None = None, progress: bool = True) -> dict[str, Any]:
    """The pack's evaluation report plus `baselines`: name -> accuracy, balanced accuracy, macro-F1, from ONE pass
    over the test examples (every head and the final hidden state). Trained baselines learn from `train` (the pack's
    labelled examples, with final hidden states); without it only zero-shot runs. `baselines_skipped` says why a
    baseline did not run."""
    from .pipeline import check_pack_fits, evaluation_examples, extract_activations

    kept, dropped = evaluation_examples(pack, examples)
    check_pack_fits(pack, loaded)
    if train is not None:
        check_training_activations(train, pack, loaded.model_metadata())
    test = extract_activations(loaded, kept, pack.prompt["template"], batch_size=batch_size, final_hidden=True,
                               progress=progress, video_frames=pack.video_frames,
                               token_position=pack.token_position)
    method = vote or pack.selection.get("vote", "majority")
    skipped: dict[str, str] = {}
    logits = None
    if loaded.model.get_output_embeddings() is None:
        skipped["zero_shot"] = f"{loaded.model_id} has no language-model head"
    else:
        ids = verbaliser_token_ids(loaded.tokenizer, verbaliser_words(pack.labels, verbalisers), pack.prompt["rendered"])
        logits = label_word_logits(loaded.model, test.final_hidden, ids)
    if train is None:
        skipped.update({name: "needs the labelled training data (--train or --train-activations)" for name in TRAINED_BASELINES})
    predictions = baseline_predictions(train, test, pack.selection.get("scoring", "paper"), method, logits,
                                       labels=pack.labels)
    truth = list(test.labels)
    # The pack's decision on test activations of every head (the numbers `classify` computes, from the same pass).
    decision = pack_decision(pack, test.activations[:, pack.heads[:, 0], pack.heads[:, 1]], method=method)
    report = classification_report(truth, [pack.labels[i] for i in decision.predictions], pack.labels)
    report["calibration"] = calibration_report(np.array([pack.labels.index(label) for label in truth]),
                                               decision.probabilities, decision.calibrated, decision.predictions)
    report["skipped_training_examples"] = dropped
    report["baselines"] = {name: {key: value[key] for key in ("accuracy", "balanced_accuracy", "macro_f1")}
                           for name, value in reports(truth, predictions, pack.labels).items()}
    report["baselines_skipped"] = skipped
    return report
