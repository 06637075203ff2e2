#!/usr/bin/env python3
"""Where int8 moves SAV labels: quantization variants of the float32 bundles tools/real_export.py made, each against
its float32 graph on held-out items (label agreement, accuracy) and timed against it at batch 1, side by side.

    python tools/int8_variants.py --out tools/results/int8_variants.json [--models gemma-3-270m,minilm] [--items 300]

Variants (onnxruntime's quantize_dynamic, per channel, unless said; the packs' scores always stay as exported):
  default           what `savpack export --quantize int8` does: MatMul weights and the token-embedding table
  no-embedding      MatMul weights only (the embedding table stays float32)
  per-tensor        the default with one scale per matrix
  attention-only    the attention projections (q, k, v, o) only
  mlp-only          the MLP's matrices only
  last-layer-float  the default without the deepest layer L*
  weights-only      int8 weights dequantized in the graph before a float32 MatMul (activations never quantized; no
                    speed-up expected: it separates what the weights' rounding does from what the activations' does)

Needs the float32 bundles tools/real_export.py writes (--cache, the same default). Prints a table; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from measure import DATA_ROOT, write_results
from savpack.cache import cache_dir

SETS = ("sst2", "trec", "subj")
VARIANTS = ("default", "no-embedding", "per-tensor", "attention-only", "mlp-only", "last-layer-float", "weights-only")
ATTENTION_MATRICES = 4  # q, k, v, o: the first weight matrices of each layer, then the MLP's


def weight_matmuls(model) -> list[tuple[str, int, bool]]:
    """(node name, layer, is attention) of every MatMul by a weight matrix outside the scores, in graph order. A layer
    starts at its query projection; its first ATTENTION_MATRICES weight matrices are the attention's."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    found, layer, position = [], -1, 0
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.name.startswith("/scores") or node.input[1] not in initializers:
            continue
        if any(name in node.name for name in ("q_proj", "query")):
            layer, position = layer + 1, 0
        found.append((node.name, layer, position < ATTENTION_MATRICES))
        position += 1
    return found


def variant_options(variant: str, matmuls: list[tuple[str, int, bool]]) -> dict[str, Any]:
    """quantize_dynamic's options for a variant: op types, per channel, the weight MatMuls left in float32."""
    deepest = max(layer for _, layer, _ in matmuls)
    keep = {"attention-only": lambda layer, attention: not attention, "mlp-only": lambda layer, attention: attention,
            "last-layer-float": lambda layer, attention: layer == deepest}.get(variant, lambda layer, attention: False)
    return {"op_types": ["MatMul"] if variant == "no-embedding" else ["MatMul", "Gather"],
            "per_channel": variant != "per-tensor",
            "exclude": [name for name, layer, attention in matmuls if keep(layer, attention)]}


def quantize_variant(source: Path, target: Path, variant: str) -> None:
    """A copy of the float32 bundle `source` at `target` with the variant's graph."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from savpack.export import onnx_graph
    from savpack.export.quantize import install_graph

    shutil.copytree(source, target)
    with tempfile.TemporaryDirectory(prefix=".variant-", dir=target.parent) as scratch:
        quantized = Path(scratch) / "quantized.onnx"
        if variant == "weights-only":
            model = onnx.load(str(source / "graph.onnx"))
            dequantize_weights(model, [name for name, _, _ in weight_matmuls(model)])
            onnx.save_model(model, str(quantized), save_as_external_data=True, location=quantized.name + ".data")
        else:
            model = onnx.load(str(source / "graph.onnx"), load_external_data=False)
            options = variant_options(variant, weight_matmuls(model))
            quantize_dynamic(str(source / "graph.onnx"), str(quantized), weight_type=QuantType.QInt8,
                             per_channel=options["per_channel"], op_types_to_quantize=options["op_types"],
                             nodes_to_exclude=onnx_graph.scoring_nodes(model) + options["exclude"],
                             use_external_data_format=True)
        del model
        install_graph(quantized, target)


def dequantize_weights(model, names: list[str]) -> None:
    """Each named MatMul's weight stored as int8 with a scale per output column (symmetric, as quantize_dynamic's per
    channel), turned back into float32 by a DequantizeLinear before the MatMul."""
    from onnx import helper, numpy_helper

    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    chosen = set(names)
    nodes = []
    for node in model.graph.node:
        if node.name not in chosen:
            continue
        tensor = initializers[node.input[1]]
        weight = numpy_helper.to_array(tensor)  # (in, out)
        scale = (np.abs(weight).max(axis=0) / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        name = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(np.clip(np.round(weight / scale), -127, 127).astype(np.int8), f"{name}__int8"))
        model.graph.initializer.extend([numpy_helper.from_array(scale, f"{name}__scale"),
                                        numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}__zero")])
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}__int8", f"{name}__scale", f"{name}__zero"], [name],
                                      axis=1, name=f"{name}__dequantize"))
    graph_nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + graph_nodes)


def labels_of(classifier, splits: dict[str, list]) -> dict[str, list[str]]:
    return {name: [result.by_pack[name].label for result in classifier.classify_batch([example.text for example in items])]
            for name, items in splits.items()}


def paired_latency(first, second, texts: list[str]) -> float:
    """Median batch-1 seconds of `second` over `first`, one item through each in turn, order alternating."""
    times: dict[int, list[float]] = {0: [], 1: []}
    pair = (first, second)
    for classifier in pair:
        classifier.classify(texts[0])  # warm-up
    for index, text in enumerate(texts):
        for which in (0, 1) if index % 2 == 0 else (1, 0):
            started = time.perf_counter()
            pair[which].classify(text)
            times[which].append(time.perf_counter() - started)
    return statistics.median(times[1]) / statistics.median(times[0])


def run_model(name: str, cache: Path, data_root: Path, items: int, latency_items: int, threads: int,
              echo: Callable[[str], None]) -> dict[str, Any]:
    from eval_real import TASKS, make_splits
    from savpack_runtime import Classifier

    source = cache / name / "float32"
    if not (source / "bundle.json").is_file():
        raise SystemExit(f"{source} is not a bundle: run tools/real_export.py first (same --cache)")
    splits = {task: make_splits(TASKS[task], data_root)["test"][:items] for task in SETS}
    truth = {task: [example.label for example in split] for task, split in splits.items()}
    float32 = Classifier.load(source, threads=threads, batch_size=8)
    reference = labels_of(float32, splits)
    latency_texts = [example.text for example in splits["sst2"][:latency_items]]
    report: dict[str, Any] = {"model": name, "items_per_set": items, "variants": {},
                              "accuracy_float32": {task: float(np.mean([a == b for a, b in zip(reference[task], truth[task])]))
                                                   for task in SETS}}
    with tempfile.TemporaryDirectory(prefix="int8-variants-", dir=cache) as work:
        for variant in VARIANTS:
            echo(f"{name}: {variant}")
            folder = Path(work) / variant
            quantize_variant(source, folder, variant)
            classifier = Classifier.load(folder, threads=threads, batch_size=8)
            found = labels_of(classifier, splits)
            report["variants"][variant] = {
                "weights_mb": round((folder / "graph.onnx.data").stat().st_size / 1e6, 1),
                "agreement": {task: float(np.mean([a == b for a, b in zip(reference[task], found[task])])) for task in SETS},
                "accuracy": {task: float(np.mean([a == b for a, b in zip(found[task], truth[task])])) for task in SETS},
                "latency_over_float32": paired_latency(float32, classifier, latency_texts)}
            del classifier
            shutil.rmtree(folder)
    return report


def print_table(reports: list[dict[str, Any]]) -> None:
    for report in reports:
        print(f"\n{report['model']} ({report['items_per_set']} test items per set; float32 accuracy "
              + ", ".join(f"{task} {value:.3f}" for task, value in report["accuracy_float32"].items()) + ")")
        print(f"  {'variant':<17} {'MB':>6} {'x faster':>8} " + " ".join(f"{'agree ' + task:>11} {'acc':>6}" for task in SETS))
        for variant, row in report["variants"].items():
            cells = " ".join(f"{row['agreement'][task]:>11.3f} {row['accuracy'][task]:>6.3f}" for task in SETS)
            print(f"  {variant:<17} {row['weights_mb']:>6.0f} {1 / row['latency_over_float32']:>8.2f} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gemma-3-270m,minilm", help="comma-separated, as tools/real_export.py names them")
    parser.add_argument("--cache", type=Path, default=cache_dir("real-export"), help="real_export.py's bundles (default %(default)s)")
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--items", type=int, default=300, help="test items per set (sst2, trec, subj)")
    parser.add_argument("--latency-items", type=int, default=30, help="items timed at batch 1 per variant")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (the machine is shared)")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    args = parser.parse_args()
    import onnxruntime

    warnings.filterwarnings("ignore", message=".*duplicate example")
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer advises pre-processing on every call
    reports = [run_model(name, args.cache, args.data_root, args.items, args.latency_items, args.threads, print)
               for name in args.models.split(",") if name]
    print_table(reports)
    result = {"reports": reports, "threads": args.threads, "sets": list(SETS), "onnxruntime": onnxruntime.__version__}
    print(f"wrote {write_results(args.out, result)}")


if __name__ == "__main__":
    main()
