"""tools/eval_scoring.py: what it reports for one seed is what the packs do (the vote pack's label is the majority
vote, the shares' metrics are the shares'), its summaries are mean and std over seeds, and its target checks read
the right cells."""

from __future__ import annotations

import numpy as np
import pytest

import eval_scoring
from savpack.classifier import SavClassifier
from savpack.extract import ActivationSet
from savpack.metrics import expected_calibration_error


def _activation_set(classes: int, per_class: int, seed: int) -> ActivationSet:
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(classes, 4, 6, 8))  # 24 heads: k = 20 fits
    labels = np.repeat(np.arange(classes), per_class)
    activations = (0.8 * directions[labels] + rng.normal(size=(len(labels), 4, 6, 8))).astype(np.float32)
    count = len(labels)
    return ActivationSet(activations, [f"c{label}" for label in labels], [np.zeros(1, np.int64)] * count,
                         {"id": "m", "grid": [4, 6, 8]}, {"template": "{text}", "rendered": "{text}"},
                         [f"d{seed}-{i}" for i in range(count)], [f"f:{i}" for i in range(count)])


def test_one_seed_reports_the_packs_own_numbers():
    train, test = _activation_set(3, 10, seed=0), _activation_set(3, 30, seed=1)
    validation = _activation_set(3, 20, seed=2)
    run = eval_scoring.evaluate_seed(train, test, seed=0, calibration=validation)
    assert set(eval_scoring.CLASSIFIERS) <= set(run) and run["shots"] == 30
    vote = SavClassifier(k=eval_scoring.DEFAULT_K, classifier="vote", random_state=0).fit(train.activations, train.labels)
    decision = vote.decide(vote.head_vectors(test.activations))
    truth = np.unique(test.labels, return_inverse=True)[1]
    assert run["vote"]["accuracy"] == pytest.approx(np.mean(decision.votes.predictions == truth))
    assert run["vote"]["vote_methods"]["majority"] == run["vote"]["accuracy"]
    assert run["vote"]["shares"]["ece"] == pytest.approx(expected_calibration_error(truth, decision.votes.shares))
    assert run["vote"]["probabilities"]["ece"] == pytest.approx(expected_calibration_error(truth, decision.probabilities))
    recalibrated = vote.calibrate(validation.activations, validation.labels).decide(vote.head_vectors(test.activations))
    assert run["vote"]["calibration_data"]["ece"] == pytest.approx(expected_calibration_error(truth, recalibrated.probabilities))
    assert run["vote"]["calibration_data"]["ece"] != run["vote"]["probabilities"]["ece"]
    assert run["probe"]["chosen"] == "probe" and run["auto"]["chosen"] in ("vote", "probe")
    assert {"cv_vote_accuracy", "cv_probe_accuracy", "probe_shrinkage"} <= set(run["auto"])


def test_summaries_are_mean_and_std_over_seeds_and_count_choices():
    runs = [{"accuracy": 0.5, "chosen": "vote", "probabilities": {"ece": 0.1}},
            {"accuracy": 0.7, "chosen": "probe", "probabilities": {"ece": 0.3}},
            {"accuracy": 0.9, "chosen": "probe", "probabilities": {"ece": 0.2}}]
    summary = eval_scoring.summarise(runs)
    assert summary["accuracy"] == pytest.approx([0.7, np.std([0.5, 0.7, 0.9])])
    assert summary["probabilities"]["ece"][0] == pytest.approx(0.2)
    assert summary["chosen"] == {"probe": 2, "vote": 1}


def test_targets_read_the_calibration_and_auto_cells():
    def cell(ece_p, ece_s, acc80, acc100, vote, vote_std, auto):
        metrics = lambda ece: {"ece": [ece, 0.0], "accuracy_at_80%": [acc80, 0.0], "accuracy_at_100%": [acc100, 0.0]}  # noqa: E731
        return {"summary": {"vote": {"probabilities": metrics(ece_p), "shares": metrics(ece_s), "accuracy": [vote, vote_std]},
                            "auto": {"accuracy": [auto, 0.0]}}}

    results = {"m": {"sst2": cell(0.04, 0.08, 0.90, 0.85, 0.85, 0.02, 0.84),
                     "trec": cell(0.07, 0.05, 0.70, 0.69, 0.60, 0.02, 0.50),
                     "trec_fine": cell(0.2, 0.1, 0.5, 0.5, 0.60, 0.01, 0.40)}}  # not one of the five: left out
    judged = eval_scoring.targets(results)
    assert judged["mean_ece"] == pytest.approx(0.055) and not judged["mean_ece_met"]
    assert judged["mean_ece_by_model"] == {"m": pytest.approx(0.055)}
    assert judged["ece_not_below_shares"] == ["m/trec"]
    assert judged["mean_coverage_gain_80"] == pytest.approx(0.03) and judged["coverage_gain_met"]
    assert judged["auto_more_than_one_std_below_vote"] == ["m/trec"]


def test_setfit_results_of_two_runs_share_one_file(tmp_path):
    """tools/eval_setfit.py: each run writes only its own set's entry, keeping what another run wrote."""
    import eval_setfit

    out = tmp_path / "setfit.json"
    eval_setfit.save_set(out, {"results": {}, "setfit": "x"}, "sst2", {"runs": [{"accuracy": 0.7}]})
    eval_setfit.save_set(out, {"results": {}, "setfit": "x"}, "trec_fine", {"runs": [{"accuracy": 0.8}]})
    eval_setfit.save_set(out, {"results": {}, "setfit": "x"}, "sst2", {"runs": [{"accuracy": 0.7}, {"accuracy": 0.9}]})
    import json

    stored = json.loads(out.read_text())
    assert stored["results"] == {"sst2": {"runs": [{"accuracy": 0.7}, {"accuracy": 0.9}]},
                                 "trec_fine": {"runs": [{"accuracy": 0.8}]}}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["setfit.json"]
    assert eval_setfit.per_set("--max-steps", ["trec_fine=1000"]) == {"trec_fine": 1000}
    with pytest.raises(SystemExit, match="SET=N"):
        eval_setfit.per_set("--max-steps", ["nope=3"])


def test_calibration_limits_scores_the_packs_own_calibration_and_the_shots_accuracy_gap():
    """tools/calibration_limits.py: its 'pack' rule is the pack's own probabilities, the in-sample 'test-fit' and
    'calibration-data' rules are fitted where they say, and the accuracy gap is the out-of-fold vote's against the test."""
    import calibration_limits
    from savpack.calibration import fit_head_calibration, out_of_fold_similarities, stratified_folds
    from savpack.metrics import expected_calibration_error
    from savpack_runtime.scoring import head_probabilities
    from savpack_runtime.vote import cosine_to_centroids, vote

    train, test, validation = _activation_set(3, 10, seed=0), _activation_set(3, 30, seed=1), _activation_set(3, 20, seed=2)
    report = calibration_limits.seed_report(train, test, validation, seed=0)
    pack = SavClassifier(k=eval_scoring.DEFAULT_K, classifier="vote", random_state=0).fit(train.activations, train.labels)
    truth = np.unique(test.labels, return_inverse=True)[1]
    decision = pack.decide(pack.head_vectors(test.activations))
    assert report["ece"]["pack"] == pytest.approx(expected_calibration_error(truth, decision.probabilities))
    test_similarities = cosine_to_centroids(pack.head_vectors(test.activations), pack.centroids_)
    fitted_on_test = head_probabilities(test_similarities, *fit_head_calibration(test_similarities, truth))
    assert report["ece"]["test-fit"] == pytest.approx(expected_calibration_error(truth, fitted_on_test))
    validation_similarities = cosine_to_centroids(pack.head_vectors(validation.activations), pack.centroids_)
    on_validation = head_probabilities(test_similarities, *fit_head_calibration(
        validation_similarities, np.unique(validation.labels, return_inverse=True)[1]))
    assert report["ece"]["calibration-data"] == pytest.approx(expected_calibration_error(truth, on_validation))
    label_index = np.unique(train.labels, return_inverse=True)[1]
    activations = pack._activations(train.activations, fitting=False)[0]
    shots = out_of_fold_similarities(pack._select(activations), label_index, 3, stratified_folds(label_index, 5, 0),
                                     pack._reselection(activations, label_index, pack.k))
    assert report["out_of_fold_accuracy"] == pytest.approx(np.mean(vote(shots, "majority", None).predictions == label_index))
    assert report["test_accuracy"] == pytest.approx(np.mean(decision.predictions == truth))
    assert set(report["ece"]) == set(calibration_limits.RULES) and len(set(report["ece"].values())) > 3
