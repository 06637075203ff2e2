"""Ablations sample shots from cached activations and agree with fitting each setting on its own."""

from __future__ import annotations

import numpy as np
import pytest

from savpack.ablations import sav_ablation, summarise
from savpack.classifier import SavClassifier
from savpack.data import sample_shots
from savpack.errors import DataError
from savpack.extract import ActivationSet
from savpack.metrics import classification_report


def _activations(rng, count, labels, signal=1.5):
    X = rng.normal(size=(count, 3, 4, 8)).astype(np.float32)
    index = np.array([("a", "b", "c").index(label) for label in labels])
    X[:, 1:, :, :3] += signal * np.eye(3, dtype=np.float32)[index][:, None, None, :]
    return ActivationSet(X, list(labels), [np.zeros(1, np.int64)] * count, {"id": "m", "grid": [3, 4, 8]},
                         {"template": "{text}"}, [f"{i:064x}" for i in range(count)], [str(i) for i in range(count)])


@pytest.fixture(scope="module")
def pool_and_test():
    rng = np.random.default_rng(0)
    pool_labels = ["a"] * 12 + ["b"] * 12 + ["c"] * 7
    test_labels = list(rng.choice(["a", "b", "c"], size=40))
    return _activations(rng, len(pool_labels), pool_labels), _activations(rng, 40, test_labels)


def test_every_run_equals_fitting_that_setting_alone(pool_and_test):
    pool, test = pool_and_test
    runs = sav_ablation(pool, test, shots=[3, 5], ks=[1, 4, None], scorings=["paper", "loo"],
                        votes=["majority", "cosine"], seeds=[0, 1])
    assert len(runs) == 2 * 2 * 2 * 3 * 2
    for run in runs:
        train = pool.subset(sample_shots(pool.labels, run.shots, run.seed)[0])
        alone = SavClassifier(k=run.k, scoring=run.scoring, vote=run.vote, classifier="vote").fit(train.activations, train.labels)
        report = classification_report(test.labels, alone.predict(test.activations), alone.classes_)
        assert run.metrics["accuracy"] == pytest.approx(report["accuracy"]), run


def test_settings_that_cannot_run_are_left_out(pool_and_test):
    pool, test = pool_and_test
    runs = sav_ablation(pool, test, shots=[5, 10], ks=[20, 48, 100], scorings=["paper"], votes=["majority"], seeds=[0])
    # Class "c" has 7 examples (no 10 shots); the grid has 3 x 4 = 12 heads (no k = 20, 48 or 100).
    assert runs == []
    assert {run.k for run in sav_ablation(pool, test, [5], [12, 13], ["paper"], ["majority"], [0])} == {12}


def test_more_shots_and_seeds_summarise_to_mean_and_std(pool_and_test):
    pool, test = pool_and_test
    runs = sav_ablation(pool, test, shots=[2, 7], ks=[4], scorings=["paper"], votes=["majority"], seeds=range(4))
    rows = {row["shots"]: row for row in summarise(runs, ("shots",))}
    for shots, row in rows.items():
        values = [run.metrics["accuracy"] for run in runs if run.shots == shots]
        assert row["runs"] == 4
        assert row["mean"] == pytest.approx(np.mean(values)) and row["std"] == pytest.approx(np.std(values))
    # The signal is strong: 7 shots per class classify well, and different seeds draw different shots.
    assert rows[7]["mean"] > 0.8
    assert len({tuple(sample_shots(pool.labels, 2, seed)[0]) for seed in range(4)}) > 1


def test_activation_sets_extracted_in_chunks_join_into_one(pool_and_test):
    pool, _ = pool_and_test
    joined = ActivationSet.concatenate([pool.subset(range(0, 10)), pool.subset(range(10, len(pool.labels)))])
    np.testing.assert_array_equal(joined.activations, pool.activations)
    assert joined.labels == pool.labels and joined.digests == pool.digests and joined.sources == pool.sources
    other = pool.subset(range(3))
    other.prompt = {"template": "Review: {text}"}
    with pytest.raises(DataError, match="activation sets from different models or prompts cannot be joined"):
        ActivationSet.concatenate([pool.subset(range(3)), other])
