#!/usr/bin/env python3
"""Where int8 moves SAV labels: quantization variants of the float32 bundles tools/real_export.py made, each against
its float32 graph on held-out items (label agreement, accuracy) and timed against it at batch 1, side by side.

    python tools/int8_variants.py --out tools/results/int8_variants.json [--models gemma-3-270m,minilm] [--items 300]

Variants (onnxruntime's quantize_dynamic, per channel, unless said; the packs' scores always stay as exported):
  default           onnxruntime's quantize_dynamic (what `savpack export --quantize int8` did before per-token): MatMul
                    weights and the token-embedding table, one activation scale per input tensor (per batch)
  no-embedding      MatMul weights only (the embedding table stays float32)
  per-tensor        the default with one scale per matrix
  attention-only    the attention projections (q, k, v, o) only
  mlp-only          the MLP's matrices only
  last-layer-float  the default without the deepest layer L*
  weights-only      int8 weights dequantized in the graph before a float32 MatMul (activations never quantized; no
                    speed-up expected: it separates what the weights' rounding does from what the activations' does)
  nbits8-b32, nbits8-b64, nbits8-b128, nbits4-b32
                    onnxruntime's MatMulNBitsQuantizer (symmetric, accuracy_level 4: activations quantized to int8 per
                    block of the given size along the inner dimension, integer kernels). MatMulNBits is a com.microsoft
                    operator, which the runtime refuses; the tool lifts that check to measure them
  static-minmax, static-percentile, static-entropy
                    onnxruntime's quantize_static (QDQ, weights per channel, activations uint8 with one scale per tensor
                    calibrated on the packs' shots by the named method); MatMul weights only
  per-token         int8 weights per output column, activations quantized per token (each row its own uint8 scale and
                    offset, computed in the graph: ReduceMax/ReduceMin, QuantizeLinear, MatMulInteger; standard
                    operators), the embedding table int8 per row: no token's outlier coarsens the others' steps.
                    What `savpack export --quantize int8` does (savpack.export.quantize.quantize_per_token)
  per-token-smooth  per-token after SmoothQuant (alpha 0.5): each MatMul input channel divided by
                    sqrt(max |activation| / max |weight row|), calibrated on the packs' shots, the weights multiplied back

Needs the float32 bundles tools/real_export.py writes (--cache, the same default). Prints a table; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import contextlib
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
VARIANTS = ("default", "no-embedding", "per-tensor", "attention-only", "mlp-only", "last-layer-float", "weights-only",
            "nbits8-b32", "nbits8-b64", "nbits8-b128", "nbits4-b32", "static-minmax", "static-percentile", "static-entropy",
            "per-token", "per-token-smooth")
PACK_SETS = ("sst2", "trec", "agnews", "sms_spam", "subj")  # tools/real_export.py's packs: their shots calibrate
SMOOTH_ALPHA = 0.5  # SmoothQuant's default migration strength
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


def quantize_variant(source: Path, target: Path, variant: str, calibration: list[str] = ()) -> None:
    """A copy of the float32 bundle `source` at `target` with the variant's graph. `calibration`: texts (the packs'
    shots) for the variants that calibrate."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from savpack.export import onnx_graph
    from savpack.export.quantize import install_graph, quantize_per_token

    shutil.copytree(source, target)
    with tempfile.TemporaryDirectory(prefix=".variant-", dir=target.parent) as scratch:
        quantized = Path(scratch) / "quantized.onnx"
        if variant in ("weights-only", "per-token", "per-token-smooth") or variant.startswith("nbits"):
            model = onnx.load(str(source / "graph.onnx"))
            names = [name for name, _, _ in weight_matmuls(model)]
            if variant == "weights-only":
                dequantize_weights(model, names)
            elif variant.startswith("per-token"):
                if variant == "per-token-smooth":
                    smooth_inputs(model, names, channel_maxima(source, model, names, calibration))
                quantize_per_token(model, names)
            else:
                model = matmul_nbits(model, names, variant)
            onnx.save_model(model, str(quantized), save_as_external_data=True, location=quantized.name + ".data")
        elif variant.startswith("static-"):
            model = onnx.load(str(source / "graph.onnx"), load_external_data=False)
            quantize_static_variant(source, quantized, model, variant.removeprefix("static-"), calibration)
        else:
            model = onnx.load(str(source / "graph.onnx"), load_external_data=False)
            options = variant_options(variant, weight_matmuls(model))
            quantize_dynamic(str(source / "graph.onnx"), str(quantized), weight_type=QuantType.QInt8,
                             per_channel=options["per_channel"], op_types_to_quantize=options["op_types"],
                             nodes_to_exclude=onnx_graph.scoring_nodes(model) + options["exclude"],
                             use_external_data_format=True)
        del model
        with contrib_operators(variant.startswith("nbits")):
            install_graph(quantized, target)


@contextlib.contextmanager
def contrib_operators(allowed: bool):
    """Let the runtime and the export's checks accept onnxruntime's com.microsoft operators (MatMulNBits), for the
    measurement only: savpack graphs use the standard operators, and the runtime refuses others."""
    from savpack.export import onnx_graph
    from savpack_runtime import session

    saved = session.STANDARD_DOMAINS
    if allowed:
        session.STANDARD_DOMAINS = onnx_graph.STANDARD_DOMAINS = saved + ("com.microsoft",)
    try:
        yield
    finally:
        session.STANDARD_DOMAINS = onnx_graph.STANDARD_DOMAINS = saved


def matmul_nbits(model, names: list[str], variant: str):
    """onnxruntime's MatMulNBitsQuantizer on the named MatMuls: 'nbits{bits}-b{block}', accuracy_level 4."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits, block = (int(part) for part in variant.removeprefix("nbits").split("-b"))
    chosen = set(names)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True, accuracy_level=4,
                                     nodes_to_exclude=[node.name for node in model.graph.node if node.name not in chosen])
    quantizer.process()
    return quantizer.model.model


def calibration_feeds(source: Path, texts: list[str]):
    """The graph's inputs for each text, one at a time (batch 1: no padding enters a calibration statistic)."""
    from savpack_runtime import Classifier, graph_inputs

    classifier = Classifier.load(source, threads=1, batch_size=1)
    preprocessor, graph = classifier.preprocessor, classifier.bundle.graph
    for text in texts:
        encoded = preprocessor.encode([preprocessor.render(text, 0)], [[]])
        feed = graph_inputs.plan(graph["kind"], graph["plan"], encoded)
        yield {name: feed[name] for name in classifier.session.input_names}


def quantize_static_variant(source: Path, target: Path, model, method: str, texts: list[str]) -> None:
    """quantize_static, QDQ, MatMul weights per channel, activations uint8 per tensor calibrated by `method`."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Shots(CalibrationDataReader):
        def __init__(self):
            self.feeds = calibration_feeds(source, texts)

        def get_next(self):
            return next(self.feeds, None)

    from onnxruntime.quantization.calibrate import HistogramCollector

    # The histogram calibrators (percentile, entropy) stack the collected arrays with np.asarray, which fails on items
    # of different lengths: give them each tensor's values flattened and joined instead (the histogram is the same).
    collect = HistogramCollector.collect
    HistogramCollector.collect = lambda self, arrays: collect(self, {name: np.concatenate([a.ravel() for a in values])
                                                                     for name, values in arrays.items()})
    chosen = {name for name, _, _ in weight_matmuls(model)}
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    quantize_static(str(source / "graph.onnx"), str(target), Shots(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=methods[method], use_external_data_format=True,
                    nodes_to_exclude=[node.name for node in model.graph.node if node.op_type == "MatMul" and node.name not in chosen])
    HistogramCollector.collect = collect


def channel_maxima(source: Path, model, names: list[str], texts: list[str]) -> dict[str, np.ndarray]:
    """max |value| per channel (last axis) of each named MatMul's input over the texts, from the float32 graph."""
    import onnx
    import onnxruntime

    chosen = set(names)
    inputs = sorted({node.input[0] for node in model.graph.node if node.name in chosen})
    probe = onnx.load(str(source / "graph.onnx"), load_external_data=False)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in inputs)
    path = source / ".calibration.onnx"  # beside the weights file it refers to
    onnx.save_model(probe, str(path))
    try:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        maxima: dict[str, np.ndarray] = {}
        for feed in calibration_feeds(source, texts):
            for name, value in zip(inputs, session.run(inputs, feed)):
                found = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
                maxima[name] = np.maximum(maxima[name], found) if name in maxima else found
    finally:
        path.unlink()
    return maxima


def smooth_inputs(model, names: list[str], maxima: dict[str, np.ndarray]) -> None:
    """SmoothQuant (alpha SMOOTH_ALPHA) before quantize_per_token: each named MatMul's input channels divided by
    factor = max|activation| ** alpha / max|weight row| ** (1 - alpha) (a Mul node per input), its weight rows multiplied
    by the same factor, so the product is unchanged in float and the activations' outlier channels shrink."""
    from onnx import helper, numpy_helper

    from savpack.export.quantize import matmuls_by_input

    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    inserted: dict[str, Any] = {}
    for group, (source, nodes) in enumerate(matmuls_by_input(model, names).items()):
        weights = [numpy_helper.to_array(initializers[node.input[1]]) for node in nodes]  # (K, N) each
        rows = np.max([np.abs(weight).max(axis=1) for weight in weights], axis=0)  # (K,)
        factor = (np.maximum(maxima[source], 1e-5) ** SMOOTH_ALPHA / np.maximum(rows, 1e-5) ** (1 - SMOOTH_ALPHA)).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(1 / factor, f"smooth.{group}"))
        inserted[nodes[0].name] = helper.make_node("Mul", [source, f"smooth.{group}"], [f"smooth.{group}.x"], name=f"smooth.{group}")
        for node, weight in zip(nodes, weights):
            scaled = numpy_helper.from_array((weight * factor[:, None]).astype(np.float32), f"smooth.{node.name}.w")
            model.graph.initializer.append(scaled)
            node.input[0], node.input[1] = f"smooth.{group}.x", scaled.name
    nodes = [new for node in model.graph.node for new in ([inserted[node.name], node] if node.name in inserted else [node])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


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


def pack_shots(source: Path, data_root: Path) -> list[str]:
    """The texts every pack of the bundle was built from (found in its set's pool by the digests the pack keeps)."""
    from eval_real import TASKS, make_splits
    from savpack.pipeline import training_examples
    from savpack_runtime import Pack

    return [example.text for task in PACK_SETS for example in
            training_examples(Pack.load(source / "packs" / f"{task}.safetensors"), make_splits(TASKS[task], data_root)["pool"])]


def run_model(name: str, cache: Path, data_root: Path, items: int, latency_items: int, threads: int,
              echo: Callable[[str], None], variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
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
    calibration = pack_shots(source, data_root) if any(v.startswith(("static", "per-token-smooth")) for v in variants) else []
    with tempfile.TemporaryDirectory(prefix="int8-variants-", dir=cache) as work:
        for variant in variants:
            echo(f"{name}: {variant}")
            folder = Path(work) / variant
            quantize_variant(source, folder, variant, calibration)
            with contrib_operators(variant.startswith("nbits")):
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
        print(f"  {'variant':<18} {'MB':>6} {'x faster':>8} " + " ".join(f"{'agree ' + task:>11} {'acc':>6}" for task in SETS))
        for variant, row in report["variants"].items():
            cells = " ".join(f"{row['agreement'][task]:>11.3f} {row['accuracy'][task]:>6.3f}" for task in SETS)
            print(f"  {variant:<18} {row['weights_mb']:>6.0f} {1 / row['latency_over_float32']:>8.2f} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gemma-3-270m,minilm", help="comma-separated, as tools/real_export.py names them")
    parser.add_argument("--cache", type=Path, default=cache_dir("real-export"), help="real_export.py's bundles (default %(default)s)")
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--items", type=int, default=300, help="test items per set (sst2, trec, subj)")
    parser.add_argument("--latency-items", type=int, default=30, help="items timed at batch 1 per variant")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (the machine is shared)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    args = parser.parse_args()
    variants = tuple(variant for variant in args.variants.split(",") if variant)
    unknown = [variant for variant in variants if variant not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    import onnxruntime

    warnings.filterwarnings("ignore", message=".*duplicate example")
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer advises pre-processing on every call
    reports = [run_model(name, args.cache, args.data_root, args.items, args.latency_items, args.threads, print, variants)
               for name in args.models.split(",") if name]
    print_table(reports)
    result = {"reports": reports, "threads": args.threads, "sets": list(SETS), "onnxruntime": onnxruntime.__version__}
    print(f"wrote {write_results(args.out, result)}")


if __name__ == "__main__":
    main()
