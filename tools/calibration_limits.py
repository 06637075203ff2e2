#!/usr/bin/env python3
"""What limits probabilities fitted on a pack's own shots (issue 14): other fitting rules, and the floor.

For each model x set x seed (tools/eval_scoring.py's shots, k and cached activations: 20 shots per class, k = 20,
the test split), the vote pack's calibration is refitted by other rules on the same out-of-fold cosines, and each is
scored on the test split (ECE, 15 bins; the label is the vote throughout):

  pack               what savpack does (savpack.calibration.fit_head_calibration): temperature T and sharpness by
                     the out-of-fold log loss, 5 stratified folds, heads re-selected inside each fold
  10-folds, leave-one-out
                     the same with 10 folds, and with one fold per example
  brier              T and sharpness minimising the out-of-fold Brier score instead of the log loss
  temperature-only   sharpness fixed at 1
  posterior-average  the probabilities averaged over the (T, sharpness) grid, each point weighted by its
                     out-of-fold likelihood (not one (T, sharpness) pair: a different formula, measured to see
                     whether integrating over the parameters' uncertainty helps)
  calibration-data   fitted on the validation split's 200 labelled examples (what `savpack build --calibration` does)
  test-fit           fitted on the test items themselves: the best the formula can do on them (in sample), a floor

and the quantity that bounds every rule that sees only the shots: the gap between the out-of-fold vote accuracy
(what the fit sees) and the pack's test accuracy, per seed, beside the part of each pack's ECE that no binning can
remove, |mean top probability - accuracy| (ECE is at least that), and how closely the two gaps move together.

    python tools/calibration_limits.py --out tools/results/calibration_limits.json   # cached activations only

Prints a table; writes JSON to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import numpy as np

from eval_real import task_activations
from eval_scoring import SCORING_TASKS, known_classes, shots_of
from measure import DATA_ROOT, machine_description, write_results
from savpack.cache import cache_dir
from savpack.calibration import (SHARPNESS, TEMPERATURES, fit_head_calibration, log_loss, out_of_fold_similarities,
                                 stratified_folds)
from savpack.classifier import DEFAULT_K, SavClassifier
from savpack.metrics import expected_calibration_error
from savpack_runtime.scoring import head_probabilities
from savpack_runtime.vote import cosine_to_centroids, vote

MODELS = ("gemma-3-270m", "minilm-cls")  # issue 14's table
SETS = ("sst2", "trec", "agnews", "sms_spam", "subj")
FOLD_RULES = {"pack": 5, "10-folds": 10, "leave-one-out": None}  # None: one fold per example
RULES = (*FOLD_RULES, "brier", "temperature-only", "posterior-average", "calibration-data", "test-fit")

# A rule: (similarities (N, k, C), labels (N,)) fitted on -> (similarities (M, k, C) -> probabilities (M, C)).
Rule = Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _pair(temperature: float, sharpness: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda similarities: head_probabilities(similarities, temperature, sharpness)


def _grid_probabilities(similarities: np.ndarray):
    """(T index, sharpness index, probabilities (N, C)) over the calibration's coarse grid."""
    for i, temperature in enumerate(TEMPERATURES):
        for j, sharpness in enumerate(SHARPNESS):
            yield i, j, head_probabilities(similarities, temperature, sharpness)  # the runtime's own formula


def fit_brier(similarities: np.ndarray, labels: np.ndarray):
    onehot = np.eye(similarities.shape[2])[labels]
    losses = np.full((len(TEMPERATURES), len(SHARPNESS)), np.inf)
    for i, j, probabilities in _grid_probabilities(similarities):
        losses[i, j] = np.mean(np.sum((probabilities - onehot) ** 2, axis=1))
    i, j = np.unravel_index(int(np.argmin(losses)), losses.shape)
    return _pair(TEMPERATURES[i], SHARPNESS[j])


def fit_temperature_only(similarities: np.ndarray, labels: np.ndarray):
    fine = np.geomspace(TEMPERATURES[0], TEMPERATURES[-1], 400)
    losses = [log_loss(head_probabilities(similarities, t, 1.0), labels) for t in fine]
    return _pair(fine[int(np.argmin(losses))], 1.0)


def fit_posterior_average(similarities: np.ndarray, labels: np.ndarray):
    total = np.full((len(TEMPERATURES), len(SHARPNESS)), np.inf)  # summed negative log likelihood
    for i, j, probabilities in _grid_probabilities(similarities):
        total[i, j] = log_loss(probabilities, labels) * len(labels)
    weights = np.exp(-(total - total.min()))
    weights /= weights.sum()

    def predict(test: np.ndarray) -> np.ndarray:
        mixed = sum(weights[i, j] * probabilities for i, j, probabilities in _grid_probabilities(test)
                    if weights[i, j] > 1e-6)
        return mixed / mixed.sum(axis=1, keepdims=True)

    return predict


def fit_log_loss(similarities: np.ndarray, labels: np.ndarray):
    return _pair(*fit_head_calibration(similarities, labels))


def seed_report(train, test, validation, seed: int) -> dict[str, Any]:
    pack = SavClassifier(k=DEFAULT_K, classifier="vote", random_state=seed).fit(train.activations, train.labels)
    position = {label: index for index, label in enumerate(pack.classes_.tolist())}
    label_index = np.array([position[label] for label in train.labels])
    truth = np.array([position[label] for label in test.labels])
    test_similarities = cosine_to_centroids(pack.head_vectors(test.activations), pack.centroids_)  # (M, k, C)
    predictions = pack.decide(pack.head_vectors(test.activations)).predictions
    activations = pack._activations(train.activations, fitting=False)[0]
    reselect = pack._reselection(activations, label_index, pack.k)
    vectors, classes = pack._select(activations), len(pack.classes_)
    fitted: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    out_of_fold = {}
    for rule, folds in FOLD_RULES.items():
        count = min(folds or len(label_index), int(np.bincount(label_index).min()))
        assignment = np.arange(len(label_index)) if folds is None else stratified_folds(label_index, count, seed)
        out_of_fold[rule] = out_of_fold_similarities(vectors, label_index, classes, assignment, reselect)
        fitted[rule] = fit_log_loss(out_of_fold[rule], label_index)
    temperature, sharpness = pack.scoring_.temperature, pack.scoring_.sharpness
    if not np.allclose(fitted["pack"](test_similarities), head_probabilities(test_similarities, temperature, sharpness)):
        raise SystemExit("the tool's 'pack' rule does not reproduce the pack's own calibration")
    shots = out_of_fold["pack"]
    fitted["brier"] = fit_brier(shots, label_index)
    fitted["temperature-only"] = fit_temperature_only(shots, label_index)
    fitted["posterior-average"] = fit_posterior_average(shots, label_index)
    validation_index = np.array([position[label] for label in validation.labels])
    fitted["calibration-data"] = fit_log_loss(
        cosine_to_centroids(pack.head_vectors(validation.activations), pack.centroids_), validation_index)
    fitted["test-fit"] = fit_log_loss(test_similarities, truth)
    oof_accuracy = float(np.mean(vote(shots, "majority", None).predictions == label_index))
    test_accuracy = float(np.mean(predictions == truth))
    report: dict[str, Any] = {"out_of_fold_accuracy": oof_accuracy, "test_accuracy": test_accuracy, "ece": {}, "confidence_gap": {}}
    for rule in RULES:
        probabilities = fitted[rule](test_similarities)
        top = probabilities.argmax(axis=1)
        report["ece"][rule] = expected_calibration_error(truth, probabilities)
        # mean top probability - accuracy of the top class: < 0 under-confident, > 0 over-confident
        report["confidence_gap"][rule] = float(probabilities.max(axis=1).mean() - np.mean(top == truth))
    return report


def cell_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def mean_std(values):
        return [float(np.mean(values)), float(np.std(values))]

    return {"ece": {rule: mean_std([run["ece"][rule] for run in runs]) for rule in RULES},
            "confidence_gap": {rule: mean_std([run["confidence_gap"][rule] for run in runs]) for rule in RULES},
            "accuracy_gap": mean_std([run["out_of_fold_accuracy"] - run["test_accuracy"] for run in runs]),
            "absolute_accuracy_gap": float(np.mean([abs(run["out_of_fold_accuracy"] - run["test_accuracy"])
                                                    for run in runs]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON results to write")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--cache", type=Path, default=cache_dir("validity"), help="activations (tools/eval_real.py's)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.report_only, args.batch_size = True, 8  # activations come from the cache only
    from threadpoolctl import threadpool_limits

    results: dict[str, dict[str, Any]] = {}
    with threadpool_limits(args.threads):
        for model, _, task, _, parts in task_activations(args, SCORING_TASKS, ("pool", "test", "validation")):
            validation = known_classes(parts["validation"], parts["pool"].labels)
            runs = [seed_report(parts["pool"].subset(shots_of(parts["pool"].labels, seed)), parts["test"], validation, seed)
                    for seed in range(args.seeds)]
            results.setdefault(model, {})[task.name] = {"summary": cell_summary(runs), "runs": runs}
    cells = [result["summary"] for sets in results.values() for result in sets.values()]
    means = {rule: float(np.mean([cell["ece"][rule][0] for cell in cells])) for rule in RULES}
    runs = [run for sets in results.values() for result in sets.values() for run in result["runs"]]
    confidence_gaps = np.array([run["confidence_gap"]["pack"] for run in runs])
    accuracy_gaps = np.array([run["out_of_fold_accuracy"] - run["test_accuracy"] for run in runs])
    # ECE >= |mean confidence - accuracy| for every pack (the triangle inequality over the bins); how much of the ECE
    # that part is, and how closely it follows the shots' error in estimating the pack's accuracy
    bound = {"mean_ece_pack": means["pack"], "mean_abs_confidence_gap": float(np.mean(np.abs(confidence_gaps))),
             "mean_abs_accuracy_gap": float(np.mean(np.abs(accuracy_gaps))),
             "correlation": float(np.corrcoef(confidence_gaps, accuracy_gaps)[0, 1]), "packs": len(runs)}
    print("| model | set | " + " | ".join(RULES) + " | OOF acc - test acc |")
    print("|---|---|" + "---|" * (len(RULES) + 1))
    for model, sets in results.items():
        for name, result in sets.items():
            summary = result["summary"]
            print(f"| {model} | {name} | " + " | ".join(f"{summary['ece'][rule][0]:.3f}" for rule in RULES) +
                  f" | {summary['accuracy_gap'][0]:+.3f} ± {summary['accuracy_gap'][1]:.3f} |")
    print("| **mean** | | " + " | ".join(f"**{means[rule]:.3f}**" for rule in RULES) + " | |")
    print(f"over {bound['packs']} packs: mean ECE {bound['mean_ece_pack']:.3f}, of which |mean confidence - accuracy| "
          f"{bound['mean_abs_confidence_gap']:.3f}; |out-of-fold accuracy - test accuracy| "
          f"{bound['mean_abs_accuracy_gap']:.3f}; correlation of the two gaps {bound['correlation']:.2f}")
    write_results(args.out, {"machine": machine_description(), "seeds": args.seeds, "k": DEFAULT_K, "rules": list(RULES),
                             "mean_ece": means, "bound": bound, "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
