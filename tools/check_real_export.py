"""A real model through build -> export -> runtime, side by side with the builder: the check CI cannot run (it needs
real weights, minutes and a few GB). For a text model, e.g. Gemma-3-270M converted from its GGUF to a folder:

    python tools/check_real_export.py --model ./gemma-3-270m --train ../shared/data/sst2/train.jsonl \
        --test ../shared/data/sst2/dev.jsonl --out gemma-bundle --json real_export.json [--shots 20] [--items 64] [--threads 2]

Steps: sample `--shots` examples per class, build a pack (k 20), export the bundle (the export validates the graph
against hooks on the model on fresh inputs), then classify `--items` held-out examples with the builder
(savpack.pipeline.classify) and with the runtime (Classifier, no torch), and compare labels and head vectors (mixed
batches of 8 and batch 1). Prints a table; writes the JSON given with --json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from measure import write_results

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "Review: {text}\nIs this review positive or negative? Answer:"


def check(model: str, train_file: str, test_file: str, out: Path, shots: int, items: int, threads: int) -> dict:
    import torch

    from savpack.data import load_examples, sample_shots
    from savpack.export.bundle import export_bundle
    from savpack.extract import extract
    from savpack.models import load_model
    from savpack.pipeline import classify, extract_activations, pack_from_activations
    from savpack_runtime import Classifier

    torch.set_num_threads(threads)
    report: dict = {"model": model, "template": TEMPLATE, "shots": shots, "items": items, "threads": threads}
    started = time.perf_counter()
    loaded = load_model(model, device="cpu", dtype="float32")
    report["model_load_s"] = time.perf_counter() - started
    train, test = load_examples(train_file), load_examples(test_file)
    chosen, _ = sample_shots([example.label for example in train], shots, seed=0)
    started = time.perf_counter()
    activations = extract_activations(loaded, [train[i] for i in chosen], TEMPLATE, batch_size=8, progress=False)
    pack = pack_from_activations(activations, k=20, name="check/real-export")
    report["build_s"] = time.perf_counter() - started
    report["heads"] = pack.heads.tolist()

    started = time.perf_counter()
    result = export_bundle(loaded, [pack], out, force=True, echo=print)
    report["export_s"] = time.perf_counter() - started
    report["graph_vs_model_max_difference"] = result.validation.max_difference
    report["validation_batches"] = result.validation.batches
    report["bundle_bytes"] = result.sizes

    rng = np.random.default_rng(0)
    held = [test[i] for i in sorted(rng.choice(len(test), min(items, len(test)), replace=False))]
    started = time.perf_counter()
    built = classify(loaded, pack, held, batch_size=8, progress=False)
    report["builder_classify_s"] = time.perf_counter() - started
    expected = extract(loaded, held, TEMPLATE, heads=pack.heads, batch_size=8, progress=False).vectors

    started = time.perf_counter()
    classifier = Classifier.load(out, threads=threads)
    report["runtime_load_s"] = time.perf_counter() - started
    started = time.perf_counter()
    results = classifier.classify_batch([{"text": example.text} for example in held])
    report["runtime_classify_s"] = time.perf_counter() - started
    batched = classifier.head_vectors([example.text for example in held])
    single = np.stack([classifier.head_vectors([example.text])[0] for example in held[:8]])
    report["runtime_vs_builder_max_difference"] = float(np.abs(batched - expected).max())
    report["runtime_batch1_vs_builder_max_difference"] = float(np.abs(single - expected[:8]).max())
    report["head_vector_max_magnitude"] = float(np.abs(expected).max())
    report["labels_equal"] = [result.label for result in results] == built.labels
    report["accuracy"] = float(np.mean([label == example.label for label, example in zip(built.labels, held)]))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local model folder (text-only decoder)")
    parser.add_argument("--train", required=True, help="labelled JSONL to sample the shots from")
    parser.add_argument("--test", required=True, help="labelled JSONL to classify")
    parser.add_argument("--out", required=True, help="bundle folder to write (replaced)")
    parser.add_argument("--json", required=True, type=Path, help="JSON results to write")
    parser.add_argument("--shots", type=int, default=20)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    report = check(args.model, args.train, args.test, Path(args.out), args.shots, args.items, args.threads)
    rows = [("graph vs model (validation, max |diff|)", f"{report['graph_vs_model_max_difference']:.2e}"),
            ("runtime vs builder, batches of 8", f"{report['runtime_vs_builder_max_difference']:.2e}"),
            ("runtime vs builder, batch 1", f"{report['runtime_batch1_vs_builder_max_difference']:.2e}"),
            ("largest head-vector value", f"{report['head_vector_max_magnitude']:.3g}"),
            ("labels equal", str(report["labels_equal"])), ("accuracy", f"{report['accuracy']:.3f}"),
            ("bundle MB", f"{sum(report['bundle_bytes'].values()) / 1e6:.0f}"), ("export s", f"{report['export_s']:.0f}"),
            (f"builder classify {report['items']} s", f"{report['builder_classify_s']:.1f}"),
            (f"runtime classify {report['items']} s", f"{report['runtime_classify_s']:.1f}")]
    for name, value in rows:
        print(f"{name:<42} {value:>12}")
    write_results(args.json, report)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
