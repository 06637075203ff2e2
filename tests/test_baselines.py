"""Each baseline computes what it claims: kNN against a brute-force loop, the probe on separable data, zero-shot
against the model's own full forward, layer selection and k=all against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from savpack.baselines import (
    LayerClassifier, LinearProbe, baseline_predictions, knn_predict, label_word_logits, softmax,
    verbaliser_token_ids, verbaliser_words,
)
from savpack.classifier import SavClassifier
from savpack.data import load_examples
from savpack.errors import BuildError
from savpack.extract import ActivationSet, extract
from savpack.pipeline import extract_activations


def brute_force_knn(train, train_index, test, k, classes):
    predictions = []
    for item in test:
        similarities = [float(item @ row / (np.linalg.norm(item) * np.linalg.norm(row))) for row in train]
        order = sorted(range(len(train)), key=lambda i: (-similarities[i], i))[:k]
        votes, summed = [0] * classes, [0.0] * classes
        for i in order:
            votes[train_index[i]] += 1
            summed[train_index[i]] += similarities[i]
        best = max(votes)
        predictions.append(max((c for c in range(classes) if votes[c] == best), key=lambda c: (summed[c], -c)))
    return np.array(predictions)


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_knn_equals_brute_force(k):
    rng = np.random.default_rng(k)
    train = rng.normal(size=(30, 12)).astype(np.float32)
    train_index = rng.integers(0, 3, size=30)
    test = rng.normal(size=(25, 12)).astype(np.float32)
    np.testing.assert_array_equal(knn_predict(train, train_index, test, k, 3), brute_force_knn(train, train_index, test, k, 3))


def test_knn_ties_go_to_the_closer_class_and_k_is_checked():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]], dtype=np.float32)
    train_index = np.array([0, 1, 0, 1])
    # Two neighbours of each class among k=4; class 1's are closer to this item.
    assert knn_predict(train, train_index, np.array([[0.2, 1.0]], np.float32), 4, 2).tolist() == [1]
    assert knn_predict(train, train_index, np.array([[1.0, 0.2]], np.float32), 4, 2).tolist() == [0]
    with pytest.raises(BuildError, match="k = 5"):
        knn_predict(train, train_index, train, 5, 2)


def test_linear_probe_separates_a_linearly_separable_set():
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(3, 40))
    def sample(count):
        labels = rng.integers(0, 3, size=count)
        points = rng.normal(size=(count, 40)) + 4.0 * directions[labels]
        return points, [("a", "b", "c")[i] for i in labels]
    X, y = sample(60)
    probe = LinearProbe().fit(X, y)
    assert probe.predict(X) == y
    X_new, y_new = sample(200)
    assert np.mean(np.array(probe.predict(X_new)) == np.array(y_new)) > 0.97
    assert probe.coef_.shape == (40, 3) and probe.labels_ == ("a", "b", "c")
    # It is at the minimum of scikit-learn's objective: the gradient, computed here independently, vanishes.
    features = (X - X.mean(axis=0)) / X.std(axis=0)
    logits = features @ probe.coef_ + probe.intercept_
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    residual = probabilities - np.eye(3)[[("a", "b", "c").index(label) for label in y]]
    assert np.abs(features.T @ residual / 60 + probe.coef_ / 60).max() < 1e-5
    assert np.abs(residual.mean(axis=0)).max() < 1e-5


def test_linear_probe_finds_a_small_signal_under_a_large_offset():
    # The class is the sign of one coordinate (margin 1); a large shared offset on the others dominates every norm.
    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 6))
    X[:, 0] = np.sign(X[:, 0]) * (1.0 + np.abs(X[:, 0]))
    X[:, 1:] += 50.0
    y = ["pos" if value > 0 else "neg" for value in X[:, 0]]
    assert LinearProbe().fit(X, y).predict(X) == y


def _grid(rng, count, labels, signal_layer, layers=4, heads=3, head_dim=5):
    X = rng.normal(size=(count, layers, heads, head_dim)).astype(np.float32)
    X[:, signal_layer, :, 0] += 3.0 * (2 * np.array(labels) - 1)[:, None]
    return X


def test_layer_selection_scores_concatenated_heads_and_votes_like_heads():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=40)
    names = [("no", "yes")[i] for i in labels]
    X = _grid(rng, 40, labels, signal_layer=2)
    model = LayerClassifier(n_layers=2).fit(X, names)
    # The score of each layer, computed directly: nearest class mean of the concatenated heads.
    flat = X.reshape(40, 4, -1)
    expected = []
    for layer in range(4):
        means = np.stack([flat[labels == c, layer].mean(axis=0) for c in (0, 1)])
        cosine = (flat[:, layer] @ means.T) / (np.linalg.norm(flat[:, layer], axis=1)[:, None] * np.linalg.norm(means, axis=1))
        expected.append(np.mean(cosine.argmax(axis=1) == labels))
    np.testing.assert_allclose(model.layer_scores_, expected, atol=1e-6)
    assert model.layers_[0] == 2 and len(model.layers_) == 2
    assert model.layers_[1] == int(np.argsort(-np.array(expected), kind="stable")[1])
    test = _grid(rng, 20, rng.integers(0, 2, size=20), signal_layer=2)
    # Two voters: majority, ties (one each) to the larger summed cosine.
    cosines = []
    for layer in model.layers_:
        means = np.stack([flat[labels == c, layer].mean(axis=0) for c in (0, 1)])
        vectors = test.reshape(20, 4, -1)[:, layer]
        cosines.append((vectors @ means.T) / (np.linalg.norm(vectors, axis=1)[:, None] * np.linalg.norm(means, axis=1)))
    cosines = np.stack(cosines, axis=1)  # (B, 2, C)
    choices = cosines.argmax(axis=2)
    expected_predictions = np.where(choices[:, 0] == choices[:, 1], choices[:, 0], cosines.sum(axis=1).argmax(axis=1))
    assert model.predict(test).tolist() == [("no", "yes")[i] for i in expected_predictions]


def test_all_heads_vote_is_every_head():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=30)
    names = [("a", "b", "c")[i] for i in labels]
    X = rng.normal(size=(30, 3, 4, 6)).astype(np.float32)
    model = SavClassifier(k=None).fit(X, names)
    assert model.heads_.shape == (12, 2)
    assert {tuple(head) for head in model.heads_.tolist()} == {(l, h) for l in range(3) for h in range(4)}
    test = rng.normal(size=(10, 3, 4, 6)).astype(np.float32)
    votes = np.zeros((10, 3), dtype=int)
    sums = np.zeros((10, 3))
    for layer in range(3):
        for head in range(4):
            means = np.stack([X[labels == c, layer, head].mean(axis=0) for c in range(3)])
            vectors = test[:, layer, head]
            cosine = (vectors @ means.T) / (np.linalg.norm(vectors, axis=1)[:, None] * np.linalg.norm(means, axis=1))
            votes[np.arange(10), cosine.argmax(axis=1)] += 1
            sums += cosine
    expected = np.where(votes == votes.max(axis=1, keepdims=True), sums, -np.inf).argmax(axis=1)
    assert model.predict(test).tolist() == [("a", "b", "c")[i] for i in expected]


def test_verbaliser_words_default_to_label_names_and_refuse_unknown_labels():
    assert verbaliser_words(["neg", "pos"], {"pos": "great"}) == ["neg", "great"]
    with pytest.raises(BuildError, match="not labels"):
        verbaliser_words(["neg", "pos"], {"neutral": "meh"})


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_zero_shot_equals_softmax_over_label_logits_of_a_full_forward(family, loaded_model, text_task):
    loaded = loaded_model(family)
    examples = load_examples(text_task[1])[:5]
    template = "Text: {text}\nKind:"
    extraction = extract(loaded, examples, template, batch_size=4, final_hidden=True, progress=False)
    ids = verbaliser_token_ids(loaded.tokenizer, ["red", "blue", "circle"], loaded.render_template(template, 0))
    probabilities = softmax(label_word_logits(loaded.model, extraction.final_hidden, ids))
    for row, example in enumerate(examples):
        encoded = loaded.encode([loaded.render(template, example.text, 0)], [[]])
        with torch.inference_mode():
            logits = loaded.model(**encoded).logits[0, -1]  # the LM's own head over the whole vocabulary
        np.testing.assert_allclose(probabilities[row], torch.softmax(logits[ids], dim=0).numpy(), atol=1e-5)


def test_zero_shot_applies_gemma_soft_capping(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from savpack.testing import build_tokenizer
    from savpack.models import load_model

    tokenizer = build_tokenizer([], None, bos="<bos>")
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    extraction = extract(loaded, load_examples_from_texts(["the red sun", "a blue square is here"]), final_hidden=True, progress=False)
    ids = np.array([5, 17, 40])
    ours = label_word_logits(loaded.model, extraction.final_hidden, ids)
    with torch.inference_mode():
        full = loaded.model(**loaded.encode(["a blue square is here"], [[]])).logits[0, -1, ids].numpy()
    np.testing.assert_allclose(ours[1], full, atol=1e-5)
    assert np.abs(ours).max() <= 0.5  # capped


def load_examples_from_texts(texts):
    from savpack.data import Example

    return [Example(text=text, label="x", source=f"item {i}") for i, text in enumerate(texts)]


@pytest.mark.parametrize("family, joiner", [("qwen2", ""), ("llama", " ")])
def test_verbaliser_token_is_the_first_token_after_the_prompt(family, joiner, loaded_model):
    # qwen2's chat template ends the prompt with a newline (the word follows directly); llama has no chat template,
    # so the prompt ends with "Kind:" and the word follows a space.
    loaded = loaded_model(family)
    rendered = loaded.render_template("Text: {text}\nKind:", 0)
    tail = rendered.split("{text}")[-1]
    assert tail.endswith("\n") == (joiner == "")
    ids = verbaliser_token_ids(loaded.tokenizer, ["red", "circle"], rendered)
    tail_length = len(loaded.tokenizer(tail, add_special_tokens=False)["input_ids"])
    for word, token in zip(["red", "circle"], ids):
        assert loaded.tokenizer(tail + joiner + word, add_special_tokens=False)["input_ids"][tail_length] == token
    with pytest.raises(BuildError, match="same token"):
        verbaliser_token_ids(loaded.tokenizer, ["red", "red"], rendered)


def test_label_word_logits_refuses_a_model_without_lm_head(loaded_model):
    with pytest.raises(BuildError, match="no language-model head"):
        label_word_logits(loaded_model("bert").model, np.zeros((1, 64), np.float32), np.array([1, 2]))


def test_baselines_share_one_pass_and_return_every_method(loaded_model, text_task):
    loaded = loaded_model("qwen2")
    train = extract_activations(loaded, load_examples(text_task[0]), final_hidden=True, progress=False)
    test = extract_activations(loaded, load_examples(text_task[1]), final_hidden=True, progress=False)
    logits = np.random.default_rng(0).normal(size=(len(test.labels), 3))
    predictions = baseline_predictions(train, test, zero_shot_logits=logits)
    assert set(predictions) == {"zero_shot", "knn_1", "knn_5", "linear_probe", "best_2_layers", "all_heads"}
    assert all(len(values) == len(test.labels) for values in predictions.values())
    assert predictions["zero_shot"] == [sorted(set(train.labels))[i] for i in logits.argmax(axis=1)]
    no_hidden = ActivationSet(train.activations, train.labels, train.input_ids, train.model, train.prompt,
                              train.digests, train.sources)
    with pytest.raises(BuildError, match="--hidden"):
        baseline_predictions(no_hidden, test, methods=("knn_1",))
