"""One batching rule for builder and runtime: one image count per batch, ordered by token count (not characters)."""

from __future__ import annotations

import numpy as np
import pytest

from savpack_runtime import Classifier
from savpack_runtime.batching import plan_batches

import golden


def test_plan_keeps_image_counts_apart_and_orders_by_tokens():
    assert plan_batches([0, 1, 0, 1, 0], [9, 3, 2, 1, 5], 2) == [[2, 4], [0], [3, 1]]
    assert plan_batches([], [], 4) == []
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        plan_batches([0], [1], 0)


def test_classifier_batches_by_token_count_as_the_builder_does():
    """The same items as the builder's test (tests/test_extract.py): characters and tokens order them differently."""
    classifier = Classifier.load(golden.bundle_dir("qwen2"), threads=1)
    texts = ["red " * 9, "x" * 38, "red " * 10, "z" * 42]
    tokens = classifier.preprocessor.token_counts([classifier.preprocessor.render(text, 0) for text in texts])
    assert tokens[0] < tokens[2] < tokens[1] < tokens[3]  # the premise: characters and tokens disagree
    seen = []
    run = classifier.session.run_all
    classifier.session.run_all = lambda feed, names=None: seen.append(feed["input_ids"].shape) or run(feed, names)
    batched = classifier.head_vectors(texts, batch_size=2)
    assert sorted(seen) == [(2, tokens[2]), (2, tokens[3])]  # short pair, long pair: the least padding possible
    single = classifier.head_vectors(texts, batch_size=1)
    assert np.abs(batched - single).max() <= 1e-5
