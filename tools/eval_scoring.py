#!/usr/bin/env python3
"""Scoring on real weights (issues 14 and 19): calibrated probabilities against the vote shares, and the linear head
(vote, probe, auto) on few and many classes.

For each model x set x seed, 20 shots per class (fewer where a class has fewer), k = 20, three packs are fitted from
the same cached activations (tools/eval_real.py: same splits, same models, same cache), SavClassifier with
classifier="vote", "probe" and "auto", and scored on the test split:

- accuracy of each, its fit time (head selection + the out-of-fold fitting), and what auto's cross-validation saw
  (cv_vote_accuracy, cv_probe_accuracy, probe_shrinkage) and chose;
- for the vote pack: ECE (15 bins), Brier, log loss and accuracy at 50/80/90% coverage of its calibrated
  probabilities, beside the same metrics of the vote shares (shares = votes / k; the label is the vote for both);
- the vote pack's probabilities recalibrated on the validation split (200 labelled examples apart from shots and
  test: what `savpack build --calibration FILE` does), to show what separate labelled data adds;
- the vote methods (majority, weighted, cosine, probability) of the vote pack;
- the forward pass's cost per example (measured on up to --forward-items of seed 0's shots), so that a pack's build
  time (forward over the shots + fit) can stand beside SetFit's fit time (tools/eval_setfit.py).

Sets: eval_real's five and trec_fine (trec's 50 fine labels, `fine_label`, with trec's prompt; test = trec's 500).

  python tools/eval_scoring.py --out tools/results/eval_scoring.json            # extracts what is missing first
  python tools/eval_scoring.py --out x.json --models minilm-cls --sets sst2 --seeds 2
  python tools/eval_scoring.py --out tools/results/eval_scoring.json --tables-only --setfit tools/results/eval_setfit.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from eval_real import MAIN_SHOTS, MODELS, TASKS, _load_model, task_activations
from measure import DATA_ROOT, machine_description, write_results
from savpack.cache import cache_dir
from savpack.classifier import DEFAULT_K, SavClassifier
from savpack.data import sample_shots
from savpack.extract import ActivationSet
from savpack.metrics import calibration_report
from savpack_runtime.scoring import DECISION_METHODS

TREC_FINE = dataclasses.replace(TASKS["trec"], name="trec_fine", label_field="fine_label")
SCORING_TASKS = {**TASKS, TREC_FINE.name: TREC_FINE}
CLASSIFIERS = ("vote", "probe", "auto")
DEFAULT_MODELS = ("gemma-3-270m", "gemma-3-270m-plain", "minilm-cls")
CALIBRATION_METRICS = ("ece", "brier", "log_loss")
COVERAGE_KEYS = ("50%", "80%", "90%")
PARTS = ("pool", "test", "validation")
# Issue 14's targets.
TARGET_ECE = 0.05
TARGET_COVERAGE_GAIN = 0.03


def shots_of(pool_labels: list[str], seed: int) -> list[int]:
    """The seed's shots (indices into the pool): MAIN_SHOTS per class, or every pool example of a class with fewer."""
    return sample_shots(pool_labels, MAIN_SHOTS, seed, fewer_ok=True)[0]


def known_classes(examples: ActivationSet, pool_labels: list[str]) -> ActivationSet:
    """The examples whose class the pool has (a pack cannot be calibrated on a class it does not know)."""
    known = set(pool_labels)
    return examples.subset([i for i, label in enumerate(examples.labels) if label in known])


def calibration_scalars(truth: np.ndarray, probabilities: np.ndarray, predictions: np.ndarray,
                        calibrated: bool = True) -> dict[str, float]:
    """ECE, Brier, log loss, accuracy at 50/80/90% and at 100% coverage (the labels' accuracy)."""
    report = calibration_report(truth, probabilities, calibrated=calibrated, predictions=predictions)
    return {**{name: report[name] for name in CALIBRATION_METRICS},
            **{f"accuracy_at_{key}": report["accuracy_at_coverage"][key] for key in COVERAGE_KEYS},
            "accuracy_at_100%": float(np.mean(predictions == truth))}


def evaluate_seed(train: ActivationSet, test: ActivationSet, seed: int,
                  calibration: ActivationSet | None = None) -> dict[str, Any]:
    """The three packs of one seed's shots, scored on the test split; with `calibration` (labelled examples apart
    from shots and test: the validation split), also the vote pack recalibrated on it (`savpack build --calibration`)."""
    run: dict[str, Any] = {"shots": len(train.labels)}
    for classifier in CLASSIFIERS:
        started = time.perf_counter()
        fitted = SavClassifier(k=DEFAULT_K, classifier=classifier, random_state=seed).fit(train.activations, train.labels)
        fit_seconds = time.perf_counter() - started
        position = {label: index for index, label in enumerate(fitted.classes_.tolist())}
        unknown = sorted(set(test.labels) - set(position))
        if unknown:
            raise SystemExit(f"test labels {unknown} have no shots; the pool lacks them")
        truth = np.array([position[label] for label in test.labels])
        vectors = fitted.head_vectors(test.activations)  # (N, k, D)
        decision = fitted.decide(vectors)
        result = {"fit_seconds": fit_seconds, "accuracy": float(np.mean(decision.predictions == truth)),
                  "chosen": fitted.scoring_.classifier, **fitted.cv_metrics_,
                  "probabilities": calibration_scalars(truth, decision.probabilities, decision.predictions)}
        if classifier == "vote":
            # The label of a vote pack must stay the heads' majority vote (issue 14: default label unchanged).
            assert np.array_equal(decision.predictions, decision.votes.predictions)
            result["shares"] = calibration_scalars(truth, decision.votes.shares, decision.predictions, calibrated=False)
            result["vote_methods"] = {method: float(np.mean(fitted.set_params(vote=method).decide(vectors).predictions
                                                            == truth)) for method in DECISION_METHODS}
            fitted.set_params(vote="majority")
            if calibration is not None:
                recalibrated = copy.deepcopy(fitted).calibrate(calibration.activations, calibration.labels)
                result["calibration_data"] = calibration_scalars(
                    truth, recalibrated.decide(vectors).probabilities, decision.predictions)
        run[classifier] = result
    return run


def forward_seconds_per_item(spec: Any, task: Any, examples: list, cache: Path, batch_size: int) -> float:
    """The forward pass's wall time per example on these examples (the model loaded beforehand, not timed)."""
    from savpack.pipeline import extract_activations

    loaded = _load_model(spec, cache)
    started = time.perf_counter()
    extract_activations(loaded, examples, spec.prompt(task), batch_size=batch_size, progress=False,
                        token_position=spec.token_position)
    return (time.perf_counter() - started) / len(examples)


def mean_std(values: list[float]) -> list[float]:
    return [float(np.mean(values)), float(np.std(values))]


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of every number in the runs (nested like one run); strings: the counts of each value."""
    first = runs[0]
    summary: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, dict):
            summary[key] = summarise([run[key] for run in runs])
        elif isinstance(value, str):
            summary[key] = {choice: sum(run[key] == choice for run in runs) for choice in sorted({run[key] for run in runs})}
        else:
            summary[key] = mean_std([float(run[key]) for run in runs])
    return summary


def evaluate(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for model, spec, task, splits, parts in task_activations(args, SCORING_TASKS, PARTS):
        if args.extract_only:
            continue
        runs = []
        for seed in range(args.seeds):
            runs.append(evaluate_seed(parts["pool"].subset(shots_of(parts["pool"].labels, seed)), parts["test"], seed,
                                      known_classes(parts["validation"], parts["pool"].labels)))
            print(f"  seed {seed}: " + "  ".join(f"{c} {runs[-1][c]['accuracy']:.3f} ({runs[-1][c]['fit_seconds']:.1f} s)"
                                                for c in CLASSIFIERS), flush=True)
        result = {"classes": len(set(parts["pool"].labels)), "test_items": len(parts["test"].labels),
                  "summary": summarise(runs), "runs": runs}
        if args.forward_items and not args.report_only:
            timed = [splits["pool"][i] for i in shots_of(parts["pool"].labels, 0)][: args.forward_items]
            result["forward_seconds_per_item"] = forward_seconds_per_item(spec, task, timed, args.cache, args.batch_size)
            result["forward_items_timed"] = len(timed)
        results.setdefault(model, {})[task.name] = result
    return results


# -- report ----------------------------------------------------------------------------------------------------------


def _cell(values: list[float] | None, digits: int = 3) -> str:
    return "—" if values is None else f"{values[0]:.{digits}f} ± {values[1]:.{digits}f}"


def _peer_cell(peer: dict[str, Any] | None) -> str:
    """SetFit's accuracy, with its seed count (fewer seeds than savpack's where it ran out of time) and its step cap."""
    if not peer:
        return "—"
    seeds = len(peer["runs"])
    capped = f", {peer['max_steps']} steps" if peer.get("max_steps") else ""
    return f"{_cell(peer['summary']['accuracy'])} ({seeds} seed{'s' if seeds > 1 else ''}{capped})"


def targets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Issue 14's and issue 19's targets, judged on the seed means of every model x set."""
    cells = [(model, name, result["summary"]) for model, sets in results.items() for name, result in sets.items()]
    calibration_cells = [(m, n, s) for m, n, s in cells if n in TASKS]  # issue 14: the five shared sets
    ece = [s["vote"]["probabilities"]["ece"][0] for _, _, s in calibration_cells]
    gains = [s["vote"]["probabilities"]["accuracy_at_80%"][0] - s["vote"]["probabilities"]["accuracy_at_100%"][0]
             for _, _, s in calibration_cells]
    worse = [f"{m}/{n}" for m, n, s in calibration_cells
             if s["vote"]["probabilities"]["ece"][0] >= s["vote"]["shares"]["ece"][0]]
    few_classes = [(m, n, s) for m, n, s in cells if n != TREC_FINE.name]
    outside = [f"{m}/{n}" for m, n, s in few_classes
               if s["auto"]["accuracy"][0] < s["vote"]["accuracy"][0] - s["vote"]["accuracy"][1]]
    by_model = {model: float(np.mean([s["vote"]["probabilities"]["ece"][0] for m, _, s in calibration_cells if m == model]))
                for model in dict.fromkeys(m for m, _, _ in calibration_cells)}
    return {"mean_ece": float(np.mean(ece)) if ece else None, "mean_ece_met": bool(ece) and float(np.mean(ece)) <= TARGET_ECE,
            "mean_ece_by_model": by_model,
            "ece_not_below_shares": worse,
            "mean_coverage_gain_80": float(np.mean(gains)) if gains else None,
            "coverage_gain_met": bool(gains) and float(np.mean(gains)) >= TARGET_COVERAGE_GAIN,
            "auto_more_than_one_std_below_vote": outside}


def markdown(results: dict[str, dict[str, Any]], setfit: dict[str, Any] | None, seeds: int) -> str:
    lines = [f"Generated by `python tools/eval_scoring.py` ({seeds} seeds; {MAIN_SHOTS} shots per class, fewer where a "
             f"class has fewer; k = {DEFAULT_K}; mean ± std over seeds).", ""]
    lines += ["Calibration of the vote pack: its probabilities (p) beside its vote shares (s); the label is the vote "
              "for both.", "",
              "| model | set | ECE p | ECE s | Brier p | Brier s | log loss p | acc@80% p | acc@80% s | acc@100% | "
              "ECE p, calibration data |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, sets in results.items():
        for name, result in sets.items():
            p, s = result["summary"]["vote"]["probabilities"], result["summary"]["vote"]["shares"]
            lines.append(f"| {model} | {name} | {_cell(p['ece'])} | {_cell(s['ece'])} | {_cell(p['brier'])} | "
                         f"{_cell(s['brier'])} | {_cell(p['log_loss'])} | {_cell(p['accuracy_at_80%'])} | "
                         f"{_cell(s['accuracy_at_80%'])} | {_cell(p['accuracy_at_100%'])} | "
                         f"{_cell(result['summary']['vote'].get('calibration_data', {}).get('ece'))} |")
    lines += ["", "Classifiers (test accuracy), auto's choice over the seeds, fit times (seconds, from activations), the "
              "forward pass per item, build = shots x forward + fit auto (seconds), SetFit's fit (seconds):", "",
              "| model | set | classes | vote | probe | auto | auto chose | SetFit | fit vote | fit probe | fit auto | "
              "forward s/item | build auto | SetFit fit |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, sets in results.items():
        for name, result in sets.items():
            summary = result["summary"]
            peer = (setfit or {}).get("results", {}).get(name)
            chosen = ", ".join(f"{choice} {count}" for choice, count in summary["auto"]["chosen"].items())
            forward = result.get("forward_seconds_per_item")
            lines.append(f"| {model} | {name} | {result['classes']} | {_cell(summary['vote']['accuracy'])} | "
                         f"{_cell(summary['probe']['accuracy'])} | {_cell(summary['auto']['accuracy'])} | {chosen} | "
                         f"{_peer_cell(peer)} | "
                         f"{_cell(summary['vote']['fit_seconds'], 2)} | {_cell(summary['probe']['fit_seconds'], 2)} | "
                         f"{_cell(summary['auto']['fit_seconds'], 2)} | {'—' if forward is None else f'{forward:.3f}'} | "
                         f"{'—' if forward is None else round(summary['shots'][0] * forward + summary['auto']['fit_seconds'][0])} | "
                         f"{_cell(peer['summary']['fit_seconds'], 1) if peer else '—'} |")
    lines += ["", "Vote methods of the vote pack (test accuracy):", "",
              "| model | set | " + " | ".join(DECISION_METHODS) + " |", "|---|---|" + "---|" * len(DECISION_METHODS)]
    for model, sets in results.items():
        for name, result in sets.items():
            methods = result["summary"]["vote"]["vote_methods"]
            lines.append(f"| {model} | {name} | " + " | ".join(_cell(methods[m]) for m in DECISION_METHODS) + " |")
    lines += ["", "Auto's cross-validation on the shots (out-of-fold accuracy, mean over seeds):", "",
              "| model | set | cv vote | cv probe | probe shrinkage (mean) |", "|---|---|---|---|---|"]
    for model, sets in results.items():
        for name, result in sets.items():
            auto = result["summary"]["auto"]
            lines.append(f"| {model} | {name} | {_cell(auto['cv_vote_accuracy'])} | {_cell(auto['cv_probe_accuracy'])} | "
                         f"{auto['probe_shrinkage'][0]:.3g} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON results to write")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--sets", default=",".join(SCORING_TASKS), help="comma-separated: " + ", ".join(SCORING_TASKS))
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--cache", type=Path, default=cache_dir("validity"), help="activations (shared with eval_real)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (the machine is shared)")
    parser.add_argument("--forward-items", type=int, default=64,
                        help="time the forward pass on up to this many of seed 0's shots (0: do not)")
    parser.add_argument("--setfit", type=Path, default=None, help="tools/eval_setfit.py's JSON: SetFit columns")
    parser.add_argument("--report-only", action="store_true", help="never run a model; use cached activations")
    parser.add_argument("--extract-only", action="store_true", help="only fill the activation cache")
    parser.add_argument("--tables-only", action="store_true",
                        help="print the tables of the JSON already at --out (with --setfit's columns); fit nothing")
    return parser.parse_args()


def main() -> None:
    import torch
    from threadpoolctl import threadpool_limits

    args = parse_args()
    setfit = json.loads(args.setfit.read_text()) if args.setfit else None
    if args.tables_only:
        stored = json.loads(args.out.read_text())
        print(markdown(stored["results"], setfit, stored["seeds"]))
        return
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        results = evaluate(args)
    if args.extract_only:
        print("activations cached")
        return
    report = {"machine": machine_description(), "seeds": args.seeds, "shots": MAIN_SHOTS, "k": DEFAULT_K,
              "threads": args.threads, "targets": targets(results),
              "results": {model: {name: {key: value for key, value in result.items() if key != "runs"}
                                  for name, result in sets.items()} for model, sets in results.items()},
              "runs": {model: {name: result["runs"] for name, result in sets.items()} for model, sets in results.items()}}
    write_results(args.out, report)
    print(markdown(results, setfit, args.seeds))
    print(json.dumps(report["targets"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
