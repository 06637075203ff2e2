"""The scoring model: out-of-fold fitting never scores an example with a model that saw it, the probabilities follow
their formulas, probe and vote packs round-trip, format-1 packs keep working, abstention is exact."""

from __future__ import annotations

import numpy as np
import pytest

from savpack import calibration
from savpack.classifier import SavClassifier
from savpack.errors import BuildError
from savpack.metrics import accuracy_at_coverage, calibration_report, expected_calibration_error
from savpack_runtime import Pack
from savpack_runtime.scoring import decide, head_probabilities, probe_features, softmax
from savpack_runtime.vote import unit


def _task(classes=3, per_class=12, heads=(2, 4), head_dim=8, separation=1.2, seed=0):
    """Activations (N, layers, heads, D) where every head carries a noisy class direction."""
    rng = np.random.default_rng(seed)
    layers, count = heads
    directions = rng.normal(size=(classes, layers, count, head_dim))
    labels = np.repeat(np.arange(classes), per_class)
    activations = separation * directions[labels] + rng.normal(size=(len(labels), layers, count, head_dim))
    return activations.astype(np.float32), np.array([f"c{label}" for label in labels])


def _vectors(classes=3, per_class=10, k=4, head_dim=6, seed=1):
    activations, labels = _task(classes, per_class, (1, k), head_dim, seed=seed)
    return activations[:, 0], np.unique(labels, return_inverse=True)[1]


def test_folds_are_stratified_and_seeded():
    labels = np.repeat(np.arange(3), [7, 5, 9])
    folds = calibration.stratified_folds(labels, 5, seed=3)
    assert np.array_equal(folds, calibration.stratified_folds(labels, 5, seed=3))
    assert not np.array_equal(folds, calibration.stratified_folds(labels, 5, seed=4))
    for label in range(3):
        per_fold = np.bincount(folds[labels == label], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1  # each class dealt evenly round the folds
    assert calibration.fold_count(np.repeat(np.arange(2), [3, 8])) == 3


def test_out_of_fold_similarities_equal_a_loop_that_leaves_the_fold_out():
    vectors, labels = _vectors()
    folds = calibration.stratified_folds(labels, 5)
    got = calibration.out_of_fold_similarities(vectors, labels, 3, folds)
    for item in range(len(labels)):
        training = folds != folds[item]
        for head in range(vectors.shape[1]):
            for label in range(3):
                centroid = vectors[training & (labels == label), head].mean(axis=0)
                expected = unit(vectors[item, head]) @ unit(centroid)
                assert got[item, head, label] == pytest.approx(expected, abs=1e-5)


def test_out_of_fold_scores_do_not_move_when_the_scored_item_changes():
    """The model scoring an item never saw it: changing the item leaves every centroid it is compared with as it was."""
    vectors, labels = _vectors()
    folds = calibration.stratified_folds(labels, 5)
    before = calibration.out_of_fold_similarities(vectors, labels, 3, folds)
    changed = vectors.copy()
    changed[0] = -changed[0] * 5 + 3
    after = calibration.out_of_fold_similarities(changed, labels, 3, folds)
    same_fold = folds == folds[0]
    # Items of the same fold are compared with centroids that exclude item 0 too: unchanged.
    assert np.allclose(before[same_fold & (np.arange(len(labels)) != 0)], after[same_fold & (np.arange(len(labels)) != 0)])
    # Items of other folds did see item 0 in their training folds: their scores move (the test can fail).
    assert not np.allclose(before[~same_fold], after[~same_fold])
    logits_before = calibration.out_of_fold_logits(vectors, labels, 3, folds, [0.5])[0.5]
    logits_after = calibration.out_of_fold_logits(changed, labels, 3, folds, [0.5])[0.5]
    others = same_fold & (np.arange(len(labels)) != 0)
    assert np.allclose(logits_before[others], logits_after[others])
    assert not np.allclose(logits_before[~same_fold], logits_after[~same_fold])


def test_out_of_fold_logits_equal_a_loop_of_probes_trained_without_the_fold():
    vectors, labels = _vectors()
    features = probe_features(vectors)
    folds = calibration.stratified_folds(labels, 4)
    got = calibration.out_of_fold_logits(vectors, labels, 3, folds, [0.2, 0.8])
    for fold in range(4):
        probes = calibration.train_probes(features[folds != fold], labels[folds != fold], 3, [0.2, 0.8])
        for shrinkage, (weight, bias) in probes.items():
            expected = features[folds == fold] @ weight.T + bias
            assert np.allclose(got[shrinkage][folds == fold], expected, atol=1e-12)


@pytest.mark.parametrize("per_class", [4, 40])  # fewer examples than features (the SVD's short side), and more
def test_the_probe_is_the_shrunk_linear_discriminant_of_its_formula(per_class):
    """The SVD solution equals the discriminant written out: S_a = (1 - a) S + a diag(S), weight_c = S_a^-1 mu_c,
    bias_c = -mu_c S_a^-1 mu_c / 2 + log(share of class c), solved densely."""
    vectors, labels = _vectors(per_class=per_class, k=4, head_dim=6)  # 24 features
    labels = np.concatenate([labels, [0]])  # unequal class shares: the prior term counts
    vectors = np.concatenate([vectors, vectors[:1] * 1.5])
    features = probe_features(vectors)
    means = np.stack([features[labels == c].mean(axis=0) for c in range(3)])
    deviations = features - means[labels]
    covariance = deviations.T @ deviations / len(features)
    probes = calibration.train_probes(features, labels, 3, [0.05, 0.5, 0.98])
    for shrinkage, (weight, bias) in probes.items():
        shrunk = (1 - shrinkage) * covariance + shrinkage * np.diag(np.diag(covariance))
        expected_weight = np.linalg.solve(shrunk, means.T).T
        expected_bias = -0.5 * np.sum(expected_weight * means, axis=1) + np.log(np.bincount(labels) / len(labels))
        assert np.allclose(weight, expected_weight, rtol=1e-8, atol=1e-8 * np.abs(expected_weight).max())
        assert np.allclose(bias, expected_bias, rtol=1e-8, atol=1e-8 * np.abs(expected_bias).max())


def test_the_probe_survives_features_constant_within_their_classes():
    """Identical examples per class (no within-class spread at all): finite weights, the classes told apart; a class
    without examples is refused by name (the folds are stratified, so fitting never asks for it)."""
    features = np.repeat(np.eye(2, 8), 4, axis=0)  # classes 0 and 1, four identical rows each
    labels = np.repeat([0, 1], 4)
    weight, bias = calibration.train_probe(features, labels, 2, 0.5)
    assert np.all(np.isfinite(weight)) and np.all(np.isfinite(bias))
    assert np.array_equal((features @ weight.T + bias).argmax(axis=1), labels)
    with pytest.raises(BuildError, match="class index 2 has none"):
        calibration.train_probe(features, labels, 3, 0.5)


def test_a_probe_pack_of_identical_examples_per_class_classifies_them():
    """Each class's examples identical (random rows repeated): the out-of-fold deviations are rounding noise, yet the
    weights stay finite in float32, the temperature fitted out of fold suits the final probe, and the pack labels
    its examples with confidence."""
    rng = np.random.default_rng(0)
    activations = np.repeat(rng.normal(size=(3, 4, 4, 16)).astype(np.float32), 4, axis=0)
    labels = np.repeat(["a", "b", "c"], 4)
    model = SavClassifier(k=4, classifier="probe").fit(activations, labels)
    assert np.all(np.isfinite(model.scoring_.probe_weight)) and np.all(np.isfinite(model.scoring_.probe_bias))
    assert np.array_equal(model.predict(activations), labels)
    assert model.predict_proba(activations).max(axis=1).min() > 0.9


def test_head_probabilities_follow_the_formula():
    rng = np.random.default_rng(0)
    similarities = rng.uniform(-1, 1, size=(5, 3, 4))
    temperature, sharpness = 0.07, 2.5
    got = head_probabilities(similarities, temperature, sharpness)
    for item in range(5):
        per_head = [np.exp(similarities[item, h] / temperature) / np.exp(similarities[item, h] / temperature).sum()
                    for h in range(3)]
        mean = np.mean(per_head, axis=0)
        expected = mean ** sharpness / (mean ** sharpness).sum()
        assert np.allclose(got[item], expected, atol=1e-12)


def test_calibration_fit_finds_the_temperature_that_generated_the_data():
    """Labels drawn from softmax(cos / 0.1) over one head: the fitted head posterior recovers that temperature."""
    rng = np.random.default_rng(5)
    similarities = rng.uniform(-1, 1, size=(4000, 1, 3))
    truth_p = head_probabilities(similarities, 0.1, 1.0)
    labels = np.array([rng.choice(3, p=p) for p in truth_p])
    temperature, sharpness = calibration.fit_head_calibration(similarities, labels)
    assert temperature / sharpness == pytest.approx(0.1, rel=0.1)  # one head: only T / sharpness is identifiable


@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e5])
def test_the_probe_temperature_is_found_at_any_scale_of_logits(scale):
    """Labels drawn from softmax(z); the logits given are z * scale: the fitted temperature is about scale, however
    large (a discriminant's logits run to thousands)."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3000, 4)) * 2
    labels = np.array([rng.choice(4, p=p) for p in softmax(logits)])
    assert calibration.fit_temperature(logits * scale, labels) == pytest.approx(scale, rel=0.1)


def test_fit_records_cross_validated_scores_and_auto_picks_by_them():
    activations, labels = _task(classes=4, per_class=10)
    vote = SavClassifier(k=4, classifier="vote").fit(activations, labels)
    probe = SavClassifier(k=4, classifier="probe").fit(activations, labels)
    auto = SavClassifier(k=4, classifier="auto").fit(activations, labels)
    assert vote.scoring_.classifier == "vote" and probe.scoring_.classifier == "probe"
    assert {"cv_vote_accuracy", "cv_probe_accuracy", "probe_shrinkage"} <= set(auto.cv_metrics_)
    margin = max(calibration.AUTO_MARGIN_EXAMPLES, calibration.AUTO_MARGIN_SHARE * len(labels)) / len(labels)
    better = auto.cv_metrics_["cv_probe_accuracy"] - auto.cv_metrics_["cv_vote_accuracy"] >= margin - 1e-9
    assert auto.scoring_.classifier == ("probe" if better else "vote")


def test_predict_proba_rows_are_distributions_in_classes_order():
    activations, labels = _task()
    for classifier in ("vote", "probe"):
        model = SavClassifier(k=4, classifier=classifier).fit(activations, labels)
        probabilities = model.predict_proba(activations)
        assert probabilities.shape == (len(labels), 3)
        assert np.allclose(probabilities.sum(axis=1), 1)
        if classifier == "probe":
            assert np.array_equal(model.classes_[probabilities.argmax(axis=1)], model.predict(activations))


def _pack(model: SavClassifier) -> Pack:
    grid = list(model.grid_)
    return model.to_pack(model={"id": "test", "revision": None, "family": "qwen2", "grid": grid, "fingerprint": None},
                         prompt={"template": "{text}", "rendered": "{text}", "image_count": 0, "chat_template_sha256": None})


@pytest.mark.parametrize("classifier", ["vote", "probe"])
def test_packs_round_trip_their_scoring_model(classifier):
    activations, labels = _task()
    model = SavClassifier(k=4, classifier=classifier).fit(activations, labels)
    pack = _pack(model)
    loaded = Pack.from_bytes(pack.to_bytes())
    assert loaded.format_version == 2 and loaded.classifier == classifier
    assert loaded.scoring == pack.scoring
    if classifier == "probe":
        assert loaded.probe_weight.shape == (3, 4 * activations.shape[-1])
        assert np.array_equal(loaded.probe_weight, model.scoring_.probe_weight)
    vectors = activations[:, loaded.heads[:, 0], loaded.heads[:, 1]]
    decision = decide(loaded.centroids, loaded.scoring_model, vectors, head_scores=loaded.head_scores)
    assert np.allclose(decision.probabilities, model.predict_proba(activations), atol=1e-6)
    assert np.array_equal(np.array(loaded.labels)[decision.predictions], model.predict(activations))


def test_a_format_1_pack_loads_and_classifies_with_shares_named_as_such():
    activations, labels = _task()
    model = SavClassifier(k=4, classifier="vote").fit(activations, labels)
    old = _pack(model).replace(scoring=None)
    loaded = Pack.from_bytes(old.to_bytes())
    assert loaded.format_version == 1 and loaded.scoring_model is None
    vectors = activations[:, loaded.heads[:, 0], loaded.heads[:, 1]]
    decision = decide(loaded.centroids, None, vectors)
    assert not decision.calibrated
    assert np.array_equal(decision.probabilities, decision.votes.shares)
    from savpack_runtime.result import results_from_decisions

    record = results_from_decisions({"p": (loaded.labels, decision)})[0].to_dict()
    assert record["calibrated"] is False and record["probabilities"] == record["shares"]


def test_abstention_withholds_labels_exactly_below_the_threshold():
    activations, labels = _task(separation=0.6)
    model = SavClassifier(k=4, classifier="vote").fit(activations, labels)
    vectors = model._select(activations)
    free = model.decide(vectors)
    top = free.probabilities.max(axis=1)
    threshold = float(np.median(top))
    held = model.decide(vectors, abstain_below=threshold)
    assert np.array_equal(held.abstained, top < threshold)
    assert held.abstained.any() and not held.abstained.all()
    from savpack_runtime.result import results_from_decisions

    records = [r.to_dict() for r in results_from_decisions({"p": (tuple(model.classes_), held)})]
    for record, withheld in zip(records, top < threshold):
        assert (record["label"] is None) == withheld == record["abstained"]
    exactly = model.decide(vectors, abstain_below=float(top[0]))
    assert not exactly.abstained[0]  # at the threshold: kept


def test_calibration_data_refits_the_temperature_only():
    activations, labels = _task(per_class=20)
    model = SavClassifier(k=4, classifier="vote").fit(activations[::2], labels[::2])
    heads, centroids = model.heads_.copy(), model.centroids_.copy()
    model.calibrate(activations[1::2], labels[1::2])
    assert model.scoring_.fitted_on == "calibration-data"
    assert np.array_equal(model.heads_, heads) and np.array_equal(model.centroids_, centroids)
    with pytest.raises(ValueError, match="not among the classes"):
        model.calibrate(activations[:3], np.array(["c0", "zz", "c1"]))


def test_too_few_examples_to_calibrate_give_a_format_1_pack():
    activations, labels = _task(per_class=1)
    model = SavClassifier(k=2).fit(activations, labels)
    assert model.scoring_ is None and not model.calibrated_
    assert _pack(model).format_version == 1
    with pytest.raises(ValueError, match="at least 2 examples per class"):
        SavClassifier(k=2, classifier="probe").fit(activations, labels)


def test_calibration_metrics_against_their_definitions():
    truth = np.array([0, 1, 1, 0, 2])
    probabilities = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.34, 0.33, 0.33], [0.1, 0.1, 0.8]])
    # bins of width 1/15: confidences 0.9, 0.7, 0.6, 0.34, 0.8 each alone in a bin; correct: T, T, F, T, T
    expected = (abs(1 - 0.9) + abs(1 - 0.7) + abs(0 - 0.6) + abs(1 - 0.34) + abs(1 - 0.8)) / 5
    assert expected_calibration_error(truth, probabilities) == pytest.approx(expected)
    report = calibration_report(truth, probabilities)
    onehot = np.eye(3)[truth]
    assert report["brier"] == pytest.approx(np.mean(((probabilities - onehot) ** 2).sum(axis=1)))
    assert report["log_loss"] == pytest.approx(-np.mean(np.log(probabilities[np.arange(5), truth])))
    predictions = probabilities.argmax(axis=1)
    # the 3 most confident (0.9, 0.8, 0.7) are all right; at 80% (4 items) 0.6's wrong answer comes in
    assert accuracy_at_coverage(truth, predictions, probabilities, 0.5) == 1.0
    assert accuracy_at_coverage(truth, predictions, probabilities, 0.8) == 0.75


def test_out_of_fold_heads_are_selected_without_the_fold():
    """SavClassifier's out-of-fold fitting selects heads on the other folds too: changing every head of one example
    moves no score of the other examples of its fold (their heads, centroids and probe never saw it), while the
    other folds, which trained on it, do move; and each fold's heads are those the fold's training part selects."""
    from savpack.selection import head_scores, top_heads

    activations, labels = _task(classes=3, per_class=10, heads=(3, 4), separation=0.5, seed=4)
    model = SavClassifier(k=3, classifier="vote").fit(activations, labels)
    index = np.unique(labels, return_inverse=True)[1]
    folds = calibration.stratified_folds(index, 5)

    def scores(acts):
        reselect = model._reselection(acts, index, 3)
        vectors = acts[:, model.heads_[:, 0], model.heads_[:, 1]]
        return (calibration.out_of_fold_similarities(vectors, index, 3, folds, reselect),
                calibration.out_of_fold_logits(vectors, index, 3, folds, [0.5], reselect)[0.5])

    changed = activations.copy()
    changed[0] = np.random.default_rng(9).normal(scale=5, size=changed[0].shape)
    (sims, logits), (sims_after, logits_after) = scores(activations), scores(changed)
    others = (folds == folds[0]) & (np.arange(len(index)) != 0)
    assert np.allclose(sims[others], sims_after[others]) and np.allclose(logits[others], logits_after[others])
    assert not np.allclose(sims[folds != folds[0]], sims_after[folds != folds[0]])
    training = folds != 2
    correct = head_scores(activations[training].reshape(training.sum(), 12, -1), index[training], 3)
    chosen = top_heads((correct / training.sum()).reshape(3, 4), 3)
    assert np.array_equal(model._reselection(activations, index, 3)(training), activations[:, chosen[:, 0], chosen[:, 1]])


@pytest.mark.parametrize("classifier", ["vote", "probe"])
def test_the_summary_of_probabilities_fitted_on_the_shots_gives_their_accuracy_estimate_and_its_error(classifier):
    from savpack_runtime.scoring import scoring_summary

    activations, labels = _task(per_class=20, separation=0.5)
    model = SavClassifier(k=4, classifier=classifier).fit(activations, labels)
    pack = Pack.from_bytes(_pack(model).to_bytes())
    if classifier == "probe":  # each classifier's own estimate
        assert pack.metrics["cv_probe_accuracy"] != pack.metrics["cv_vote_accuracy"]
    accuracy = pack.metrics["cv_probe_accuracy" if classifier == "probe" else "cv_vote_accuracy"]
    error = np.sqrt(accuracy * (1 - accuracy) / len(labels))
    assert f"out-of-fold accuracy {accuracy:.3f} ± {error:.3f} from {len(labels)} examples" in scoring_summary(pack)
    for hostile in ("0.9", 1.5, -0.1, None, True, float("nan")):  # metrics are free-form JSON in the file
        assert "out-of-fold" not in scoring_summary(pack.replace(metrics={**pack.metrics, "cv_vote_accuracy": hostile,
                                                                          "cv_probe_accuracy": hostile}))
    model.calibrate(activations, labels)  # fitted on separate data: no such caveat
    assert "out-of-fold" not in scoring_summary(_pack(model))
