"""The reference re-implementation of the original SAVs procedure (tools/reference_sav.py) agrees with savpack's
default build and classify on tiny fixtures, and really does the original's work (3 full forwards per example)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import instrument
import reference_sav
from conftest import task_for
from savpack.data import load_examples
from savpack.pipeline import classify, extract_activations, pack_from_activations



@pytest.mark.parametrize("name", ["qwen2", "qwen2_vl"])
def test_reference_selects_the_same_heads_and_predicts_the_same(name, loaded_model, colour_task, text_task):
    loaded = loaded_model(name)
    train_file, test_file = task_for(name, colour_task, text_task)
    train, test = load_examples(train_file), load_examples(test_file)

    with instrument.count_forwards(loaded) as savpack_log:
        activations = extract_activations(loaded, train, "{text}", batch_size=4, progress=False)
    pack = pack_from_activations(activations, k=12)
    ours = classify(loaded, pack, test, batch_size=4, progress=False)

    with instrument.count_forwards(loaded) as build_log:
        reference = reference_sav.encode(loaded, train, "{text}", k=12)
    with instrument.count_forwards(loaded) as classify_log:
        predicted = reference_sav.classify(loaded, reference, test)

    assert reference.labels == list(pack.labels)
    np.testing.assert_array_equal(reference.heads, pack.heads)
    np.testing.assert_allclose(reference.head_correct / len(train), pack.all_head_scores, atol=1e-6)
    np.testing.assert_allclose(reference.centroids, pack.centroids, rtol=1e-4, atol=1e-5)
    assert predicted == ours.labels
    # savpack: each example through the model once, batched, and never the LM head.
    assert savpack_log.rows == len(train) and savpack_log.batches[0] == 4 and savpack_log.lm_head_calls == 0
    # The original's cost: three passes over the labelled set, one full forward (with the LM head) per example each.
    assert build_log.batches == [1] * (3 * len(train))
    assert build_log.lm_head_calls == 3 * len(train)
    assert classify_log.batches == [1] * len(test)
    assert classify_log.lm_head_calls == len(test)
    # FLOPs the instrument counts: the reference's LM head at every position; savpack's never.
    lm_head = loaded.model.get_output_embeddings()
    assert build_log.flops["lm_head"] == 2 * build_log.tokens * lm_head.in_features * lm_head.out_features
    assert savpack_log.flops["lm_head"] == 0 and savpack_log.flops["language"] > 0
    if name == "qwen2":  # text only: every language-model weight once per token, three passes
        weights = sum(m.weight.numel() for m in loaded.model.modules()
                      if isinstance(m, torch.nn.Linear) and m is not lm_head)
        assert build_log.flops == {"vision": 0, "language": 2 * build_log.tokens * weights,
                                   "lm_head": build_log.flops["lm_head"]}
    else:
        assert build_log.flops["vision"] == 3 * savpack_log.flops["vision"] > 0  # same images, thrice


def test_scoring_loop_matches_vectorised_scoring():
    from savpack.selection import head_scores

    rng = np.random.default_rng(0)
    classes, heads, dim = 4, 30, 16
    label_index = np.repeat(np.arange(classes), 6)
    centres = rng.normal(size=(classes, heads, dim))
    vectors = (centres[label_index] + 1.5 * rng.normal(size=(len(label_index), heads, dim))).astype(np.float32)

    looped = reference_sav.score_heads_loop(torch.from_numpy(vectors), label_index.tolist(), classes)
    vectorised = head_scores(vectors, label_index, classes)
    np.testing.assert_array_equal(looped, vectorised.astype(np.int64))
    assert 0 < looped.min() < looped.max() <= len(label_index)  # a real spread of scores, not a degenerate case


def test_top_heads_ties_go_to_lower_layer_then_head():
    from savpack.selection import top_heads

    scores = np.array([3, 5, 5, 1, 5, 3], dtype=np.int64)  # 3 layers x 2 heads
    expected = np.array([[0, 1], [1, 0], [2, 0], [0, 0]])
    np.testing.assert_array_equal(reference_sav.top_heads_by_score(scores, 2, 4), expected)
    np.testing.assert_array_equal(top_heads(scores.reshape(3, 2).astype(np.float32), 4), expected)
