"""The vectorised selection against a plain loop over heads and examples written from the paper's formulas."""

import numpy as np
import pytest

from savpack.classifier import SavClassifier
from savpack.errors import BuildError
from savpack.selection import head_scores, top_heads


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def loop_scores(X, y, classes, leave_one_out=False):
    """Per head: class means; each example goes to its cosine-nearest mean; count the correct ones."""
    count, heads, _ = X.shape
    scores = np.zeros(heads)
    for head in range(heads):
        for i in range(count):
            similarities = []
            for c in range(classes):
                members = [j for j in range(count) if y[j] == c and not (leave_one_out and j == i)]
                mean = np.mean([X[j, head] for j in members], axis=0)
                similarities.append(cosine(X[i, head], mean))
            scores[head] += int(np.argmax(similarities) == y[i])
    return scores


def loop_top(scores_by_layer_head, k):
    entries = [(-scores_by_layer_head[l, h], l, h) for l in range(scores_by_layer_head.shape[0]) for h in range(scores_by_layer_head.shape[1])]
    return [[l, h] for _, l, h in sorted(entries)[:k]]


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_scores_equal_the_loop_on_random_activations(leave_one_out):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(24, 10, 6)).astype(np.float32)
    y = np.arange(24) % 3
    X[y == 1, :4] += 0.8  # some heads carry the class
    got = head_scores(X, y, 3, "loo" if leave_one_out else "paper")
    assert np.array_equal(got, loop_scores(X.astype(np.float64), y, 3, leave_one_out))


def test_top_heads_break_ties_by_layer_then_head():
    scores = np.array([[1, 3, 3], [3, 2, 3]], dtype=np.float32)
    assert top_heads(scores, 4).tolist() == [[0, 1], [0, 2], [1, 0], [1, 2]]
    assert top_heads(scores, 4).tolist() == loop_top(scores, 4)


def test_top_heads_refuses_k_beyond_the_grid():
    with pytest.raises(BuildError, match="2 x 3 = 6"):
        top_heads(np.zeros((2, 3)), 7)


def test_classifier_selects_and_votes_like_the_loop():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(30, 3, 4, 5)).astype(np.float32)  # (N, layers, heads, D)
    y = [["cat", "dog", "eel"][i % 3] for i in range(30)]
    X[np.array(y) == "dog", 1, 2] += 2.0
    X[np.array(y) == "eel", 2, 0] -= 2.0
    classifier = SavClassifier(k=5, classifier="vote").fit(X, y)
    labels_index = np.array([list(classifier.classes_).index(label) for label in y])
    expected_scores = loop_scores(X.reshape(30, 12, 5).astype(np.float64), labels_index, 3).reshape(3, 4) / 30
    assert np.allclose(classifier.all_head_scores_, expected_scores)
    assert classifier.heads_.tolist() == loop_top(expected_scores, 5)
    # centroids: class means of the chosen heads, (k, C, D)
    for position, (layer, head) in enumerate(classifier.heads_):
        for c, label in enumerate(classifier.classes_):
            mean = X[[i for i in range(30) if y[i] == label], layer, head].mean(axis=0)
            assert np.allclose(classifier.centroids_[position, c], mean, atol=1e-6)
    # predictions: majority of per-head nearest centroids; a tie goes to the larger summed cosine, then the lower class
    tied_items = 0
    for i in range(30):
        similarities = np.array([[cosine(X[i, l, h], classifier.centroids_[p, c]) for c in range(3)]
                                 for p, (l, h) in enumerate(classifier.heads_)])  # (k, C)
        counts = np.bincount(similarities.argmax(axis=1), minlength=3)
        tied = [c for c in range(3) if counts[c] == counts.max()]
        tied_items += len(tied) > 1
        expected = max(tied, key=lambda c: (similarities[:, c].sum(), -c))
        assert classifier.predict(X[i : i + 1]).tolist() == [classifier.classes_[expected]], i
    assert tied_items >= 3  # the tie-break is exercised, not only untied items
    assert classifier.score(X, y) > 0.9


def test_all_heads_and_errors():
    X = np.random.default_rng(0).normal(size=(6, 2, 2, 3)).astype(np.float32)
    assert SavClassifier(k=None).fit(X, ["a", "b"] * 3).heads_.shape == (4, 2)
    with pytest.raises(BuildError, match="only one class"):
        SavClassifier(k=2).fit(X, ["a"] * 6)
    with pytest.raises(BuildError, match="2 x 2 = 4"):
        SavClassifier(k=5).fit(X, ["a", "b"] * 3)
    with pytest.raises(BuildError, match="at least 2 examples per class"):
        SavClassifier(k=2, scoring="loo").fit(X, ["a"] * 5 + ["b"])


def test_selection_on_a_fixture_equals_the_loop(loaded_model, text_task):
    from savpack.data import load_examples
    from savpack.extract import extract

    examples = load_examples(text_task[0])
    X = extract(loaded_model("qwen2"), examples, progress=False).vectors
    y = [example.label for example in examples]
    classifier = SavClassifier(k=6, classifier="vote").fit(X, y)
    index = np.array([list(classifier.classes_).index(label) for label in y])
    expected = loop_scores(X.reshape(len(y), -1, X.shape[-1]).astype(np.float64), index, 3).reshape(X.shape[1:3]) / len(y)
    assert np.allclose(classifier.all_head_scores_, expected)
    assert classifier.heads_.tolist() == loop_top(expected, 6)
