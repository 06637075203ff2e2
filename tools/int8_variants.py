#!/usr/bin/env python3
"""Where int8 moves SAV labels: quantization variants of the float32 bundles tools/real_export.py made, each against
its float32 graph on held-out items (label agreement, accuracy) and timed against it at batch 1, side by side.

    python tools/int8_variants.py --out tools/results/int8_variants.json [--models gemma-3-270m,minilm] [--items 300]
        [--sets sst2,trec,subj] [--batch-check]

--batch-check also classifies the items one at a time and reports, per variant and set, the share of labels that
differ from batch 8's (labels_differing_batch8_vs_batch1): whether an item's label depends on the items batched with
it (tools/results/int8_batch.json: `--variants default,per-token --batch-check`).

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
                    What `savpack export --quantize int8` does (savpack.export.quantize.quantize_per_token), which
                    since the rotation also rotates each row in Hadamard blocks before its rounding
  per-token-unrotated  per-token without the rotation (what the export did before it, and these results up to
                    tools/results/real_export_cosine_scan.json)
  per-token-smooth  per-token after SmoothQuant (alpha 0.5): each MatMul input channel divided by
                    sqrt(max |activation| / max |weight row|), calibrated on the packs' shots, the weights multiplied back
  mixed-shots, mixed-b01, mixed-b02, mixed-b03, mixed-b05
                    sensitivity-guided mixed precision, chosen on the packs' own shots only (the held-out items judge):
                    the weight MatMuls fall in groups (each layer's attention q/k/v/o, its MLP, the embedding table);
                    each group is quantized alone (simulate_dynamic: quantize_dynamic's nodes, built in place) and its
                    disturbance measured on every pack's shots by the export's judge (ShotJudge: the change of each
                    shot's lead of its most probable class over the runner-up, over the mean float32 lead; max over the
                    packs); groups are then quantized from the least disturbing on, keeping the longest prefix whose
                    graph keeps every shot's label in every pack and, for mixed-bNN, disturbs no pack by more than NN
                    hundredths (the export's absolute budget; results before the rotation used mixed-rNN: NN% of what
                    quantizing every group does to the pack). The chosen graph is quantize_dynamic's (per channel)
                    with the other groups' MatMuls excluded (float32; the embedding table float32 unless chosen)
  mixed-b01-per-token, ..., mixed-b05-per-token (any mixed variant with -per-token)
                    the same groups quantized as per-token does (the embedding table int8 per row if chosen)
                    --split-groups takes the export's groups instead (savpack.export.quantize.matmul_groups, the
                    MatMuls reading one tensor): each layer's q, k, v | o | gate, up | down
                    --reuse-scan RESULTS.json reuses the judgements an earlier run's JSON records (its mixed.judged;
                    runs from before savpack.export.quantize.choose_int8_groups recorded none) instead of judging
                    them again (the same bundles and shots)

Needs the float32 bundles tools/real_export.py writes (--cache, the same default). Prints a table; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from savpack.export.quantize import (EMBEDDING_GROUP, SHOT_AGREEMENT, ShotJudge, choose_int8_groups, embedding_gather,
                                     int8_columns, matmul_groups, replace_nodes)

SETS = ("sst2", "trec", "subj")
# Mixed precision: the weight-MatMul groups quantized, the others left float32, chosen on the packs' shots (see
# savpack.export.quantize.choose_int8_groups). The number after "mixed-b" is the disturbance budget in hundredths of
# a typical decision's lead; `savpack export --quantize int8` chooses as mixed-b02-per-token with --split-groups, with
# its own per-token judge instead of the dynamic simulation.
MIXED_BUDGETS = {"mixed-shots": None, "mixed-b01": 0.01, "mixed-b02": 0.02, "mixed-b03": 0.03, "mixed-b05": 0.05}
MIXED_VARIANTS = tuple(MIXED_BUDGETS) + tuple(f"{name}-per-token" for name in MIXED_BUDGETS)
VARIANTS = ("default", "no-embedding", "per-tensor", "attention-only", "mlp-only", "last-layer-float", "weights-only",
            "nbits8-b32", "nbits8-b64", "nbits8-b128", "nbits4-b32", "static-minmax", "static-percentile", "static-entropy",
            "per-token", "per-token-unrotated", "per-token-smooth") + MIXED_VARIANTS
PACK_SETS = ("sst2", "trec", "agnews", "sms_spam", "subj")  # tools/real_export.py's packs: their shots calibrate
SMOOTH_ALPHA = 0.5  # SmoothQuant's default migration strength
ATTENTION_MATRICES = 4  # q, k, v, o: the first weight matrices of each layer, then the MLP's


def weight_matmuls(model) -> list[tuple[str, int, bool]]:
    """(node name, layer, is attention) of every MatMul by a weight matrix outside the scores, in graph order. A layer
    starts at its query projection; its first ATTENTION_MATRICES weight matrices are the attention's."""
    from savpack.export import quantize

    weights = set(quantize.weight_matmuls(model))  # the export's rule: 2-D weight matrices outside the scores
    found, layer, position = [], -1, 0
    for node in model.graph.node:
        if node.name not in weights or node.op_type != "MatMul":  # the variants rewrite MatMuls (the export, Gemms too)
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


def quantize_variant(source: Path, target: Path, variant: str, calibration: list[str] = (),
                     to_quantize: list[str] = ()) -> None:
    """A copy of the float32 bundle `source` at `target` with the variant's graph. `calibration`: texts (the packs'
    shots) for the variants that calibrate; `to_quantize`: the mixed variants' chosen MatMul names (and EMBEDDING_GROUP
    when the embedding table is quantized), every other weight MatMul staying float32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from savpack.export import onnx_graph
    from savpack.export.quantize import install_graph, quantize_per_token

    shutil.copytree(source, target)
    with tempfile.TemporaryDirectory(prefix=".variant-", dir=target.parent) as scratch:
        quantized = Path(scratch) / "quantized.onnx"
        if variant in MIXED_VARIANTS and not variant.endswith("per-token"):
            model = onnx.load(str(source / "graph.onnx"), load_external_data=False)
            chosen = set(to_quantize)
            quantize_dynamic(str(source / "graph.onnx"), str(quantized), weight_type=QuantType.QInt8,
                             per_channel=True, op_types_to_quantize=["MatMul", "Gather"] if EMBEDDING_GROUP in chosen else ["MatMul"],
                             nodes_to_exclude=onnx_graph.scoring_nodes(model) + [name for name, _, _ in weight_matmuls(model)
                                                                                if name not in chosen],
                             use_external_data_format=True)
        elif variant in ("weights-only", "per-token", "per-token-unrotated", "per-token-smooth") or variant.startswith("nbits") \
                or variant in MIXED_VARIANTS:
            model = onnx.load(str(source / "graph.onnx"))
            names = [name for name, _, _ in weight_matmuls(model)]
            if variant in MIXED_VARIANTS:
                quantize_per_token(model, [name for name in names if name in set(to_quantize)],
                                   embedding=EMBEDDING_GROUP in to_quantize)
            elif variant == "weights-only":
                dequantize_weights(model, names)
            elif variant.startswith("per-token"):
                if variant == "per-token-smooth":
                    smooth_inputs(model, names, channel_maxima(source, model, names, calibration))
                quantize_per_token(model, names, rotate=variant != "per-token-unrotated")
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
        integers, scale = int8_columns(weight)
        name = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(integers, f"{name}__int8"))
        model.graph.initializer.extend([numpy_helper.from_array(scale, f"{name}__scale"),
                                        numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}__zero")])
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}__int8", f"{name}__scale", f"{name}__zero"], [name],
                                      axis=1, name=f"{name}__dequantize"))
    graph_nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + graph_nodes)


def layer_groups(matmuls: list[tuple[str, int, bool]]) -> dict[str, list[str]]:
    """Weight MatMuls by group, in graph order: 'layer{L}.attention' (q, k, v, o) and 'layer{L}.mlp'. (--split-groups
    takes the export's groups instead, savpack.export.quantize.matmul_groups: the MatMuls reading one tensor.)"""
    groups: dict[str, list[str]] = {}
    for name, layer, attention in matmuls:
        groups.setdefault(f"layer{layer}.{'attention' if attention else 'mlp'}", []).append(name)
    return groups


def simulate_dynamic(model, folder: Path, names: set[str], embedding: bool) -> None:
    """In place, the nodes quantize_dynamic (per channel) would make, built directly so that a scan needs no copy of
    the weights: each named MatMul's weight int8, symmetric, a scale per output column; its input quantized per
    tensor by DynamicQuantizeLinear (uint8); MatMulInteger; the product scaled back. `embedding`: the token-embedding
    table int8 with one scale (as quantize_dynamic's Gather), dequantized after the lookup. Untouched weights stay in
    `folder`'s external data, so the model must be saved in `folder`."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    added, replace = [], {}
    for node in model.graph.node:
        if node.name not in names:
            continue
        p = f"scan.{len(replace)}"
        weight = numpy_helper.to_array(initializers[node.input[1]], base_dir=str(folder))  # (K, N)
        integers, scale = int8_columns(weight)
        added += [numpy_helper.from_array(integers, f"{p}.w"),
                  numpy_helper.from_array(scale, f"{p}.scale")]
        replace[node.name] = [
            helper.make_node("DynamicQuantizeLinear", [node.input[0]], [f"{p}.x", f"{p}.xs", f"{p}.xz"], name=f"{p}.q"),
            helper.make_node("MatMulInteger", [f"{p}.x", f"{p}.w", f"{p}.xz"], [f"{p}.i32"], name=f"{p}.matmul"),
            helper.make_node("Cast", [f"{p}.i32"], [f"{p}.f"], to=TensorProto.FLOAT, name=f"{p}.cast"),
            helper.make_node("Mul", [f"{p}.xs", f"{p}.scale"], [f"{p}.s"], name=f"{p}.s"),
            helper.make_node("Mul", [f"{p}.f", f"{p}.s"], [node.output[0]], name=f"{p}.product")]
    gather = embedding_gather(model) if embedding else None
    if gather is not None:
        table = numpy_helper.to_array(initializers[gather.input[0]], base_dir=str(folder))
        integers, scale = int8_columns(table, per_channel=False)  # one scale for the table, as quantize_dynamic's Gather
        added += [numpy_helper.from_array(integers, "scan.table"),
                  numpy_helper.from_array(scale[0], "scan.table_scale"), numpy_helper.from_array(np.int8(0), "scan.table_zero")]
        del table
        replace[gather.name] = [
            helper.make_node("Gather", ["scan.table", gather.input[1]], ["scan.rows"], axis=0, name="scan.rows"),
            helper.make_node("DequantizeLinear", ["scan.rows", "scan.table_scale", "scan.table_zero"], [gather.output[0]],
                             name="scan.embedding")]
    replace_nodes(model, replace, added)


class RememberingJudge:
    """A judge (savpack.export.quantize.ShotJudge) whose judgements are remembered by the groups quantized, so that the
    mixed variants' budgets share one scan, and --reuse-scan seeds them from an earlier run's JSON (`record()`)."""

    def __init__(self, inner, groups: dict[str, list[str]], earlier: list[dict[str, Any]] = ()):
        self.inner, self.group_of = inner, {name: group for group, names in groups.items() for name in names}
        self.seen = {tuple(entry["groups"]): entry["result"] for entry in earlier}

    def judge(self, names, embedding: bool) -> dict[str, dict[str, float]]:
        key = tuple(sorted({self.group_of[name] for name in names} | ({EMBEDDING_GROUP} if embedding else set())))
        if key not in self.seen:
            self.seen[key] = self.inner.judge(names, embedding)
        return self.seen[key]

    def record(self) -> list[dict[str, Any]]:
        return [{"groups": list(key), "result": result} for key, result in self.seen.items()]


def labels_of(classifier, splits: dict[str, list], batch_size: int | None = None) -> dict[str, list[str]]:
    return {name: [result.by_pack[name].label for result in
                   classifier.classify_batch([example.text for example in items], batch_size=batch_size)]
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
    """The texts every pack of the bundle was built from, all packs' in one list."""
    return [text for texts in shots_by_pack(source, data_root).values() for text in texts]


def shots_by_pack(source: Path, data_root: Path) -> dict[str, list[str]]:
    """pack -> the texts it was built from (found in its set's pool by the digests the pack keeps)."""
    from eval_real import TASKS, make_splits
    from savpack.pipeline import training_examples
    from savpack_runtime import Pack

    return {task: [example.text for example in training_examples(Pack.load(source / "packs" / f"{task}.safetensors"),
                                                                 make_splits(TASKS[task], data_root)["pool"])]
            for task in PACK_SETS}


def run_model(name: str, cache: Path, data_root: Path, items: int, latency_items: int, threads: int,
              echo: Callable[[str], None], variants: tuple[str, ...] = VARIANTS,
              earlier: dict[str, Any] | None = None, split_groups: bool = False,
              sets: tuple[str, ...] = SETS, batch_check: bool = False) -> dict[str, Any]:
    """`earlier`: an earlier run's "mixed" record for this model (--reuse-scan: its judgements are reused); split_groups: the mixed
    variants' groups split by input (--split-groups); sets: whose test items judge (--sets)."""
    from eval_real import TASKS, make_splits
    from savpack_runtime import Classifier

    source = cache / name / "float32"
    if not (source / "bundle.json").is_file():
        raise SystemExit(f"{source} is not a bundle: run tools/real_export.py first (same --cache)")
    splits = {task: make_splits(TASKS[task], data_root)["test"][:items] for task in sets}
    truth = {task: [example.label for example in split] for task, split in splits.items()}
    float32 = Classifier.load(source, threads=threads, batch_size=8)
    reference = labels_of(float32, splits)
    latency_texts = [example.text for example in make_splits(TASKS["sst2"], data_root)["test"][:latency_items]]  # whatever the sets
    report: dict[str, Any] = {"model": name, "items_per_set": items, "sets": list(sets), "variants": {},
                              "accuracy_float32": {task: float(np.mean([a == b for a, b in zip(reference[task], truth[task])]))
                                                   for task in sets}}
    calibration = pack_shots(source, data_root) if any(v.startswith(("static", "per-token-smooth")) for v in variants) else []
    budgets = {base: budget for base, budget in MIXED_BUDGETS.items() if base in variants or f"{base}-per-token" in variants}
    if budgets:
        import onnx

        echo(f"{name}: choosing the mixed variants' int8 groups on the packs' shots")
        started = time.perf_counter()
        shots = shots_by_pack(source, data_root)
        model = onnx.load(str(source / "graph.onnx"), load_external_data=False)
        groups = matmul_groups(model) if split_groups else dict(layer_groups(weight_matmuls(model)), **{EMBEDDING_GROUP: []})
        del model
        judge = RememberingJudge(ShotJudge(source, shots, lambda model, names, embedding: simulate_dynamic(
            model, source, set(names), embedding), threads), groups, (earlier or {}).get("judged", []))
        choices = {variant: choose_int8_groups(judge, groups, budget) for variant, budget in budgets.items()}
        report["mixed"] = {"groups": groups, "quantized": {variant: choice["int8_groups"] for variant, choice in choices.items()},
                           "choices": choices, "judged": judge.record(), "split_groups": split_groups,
                           "shots": {task: len(texts) for task, texts in shots.items()}, "budgets": budgets,
                           "shot_agreement": SHOT_AGREEMENT, "seconds": round(time.perf_counter() - started)}
    with tempfile.TemporaryDirectory(prefix="int8-variants-", dir=cache) as work:
        for variant in variants:
            echo(f"{name}: {variant}")
            folder = Path(work) / variant
            chosen = report["mixed"]["quantized"][variant.removesuffix("-per-token")] if variant in MIXED_VARIANTS else []
            to_quantize = [member for group in chosen for member in report["mixed"]["groups"][group]] + \
                ([EMBEDDING_GROUP] if EMBEDDING_GROUP in chosen else [])
            quantize_variant(source, folder, variant, calibration, to_quantize)
            with contrib_operators(variant.startswith("nbits")):
                classifier = Classifier.load(folder, threads=threads, batch_size=8)
            found = labels_of(classifier, splits)
            report["variants"][variant] = {
                "weights_mb": round((folder / "graph.onnx.data").stat().st_size / 1e6, 1),
                "agreement": {task: float(np.mean([a == b for a, b in zip(reference[task], found[task])])) for task in sets},
                "accuracy": {task: float(np.mean([a == b for a, b in zip(found[task], truth[task])])) for task in sets},
                "latency_over_float32": paired_latency(float32, classifier, latency_texts)}
            if batch_check:  # the same items one at a time: does an item's label depend on its batch-mates?
                alone = labels_of(classifier, splits, batch_size=1)
                report["variants"][variant]["labels_differing_batch8_vs_batch1"] = {
                    task: float(np.mean([a != b for a, b in zip(found[task], alone[task])])) for task in sets}
            if variant in MIXED_VARIANTS:
                report["variants"][variant]["float32_groups"] = [group for group in report["mixed"]["groups"]
                                                                 if group not in chosen]
            del classifier
            shutil.rmtree(folder)
    return report


def print_table(reports: list[dict[str, Any]]) -> None:
    for report in reports:
        print(f"\n{report['model']} ({report['items_per_set']} test items per set; float32 accuracy "
              + ", ".join(f"{task} {value:.3f}" for task, value in report["accuracy_float32"].items()) + ")")
        sets = report["sets"]
        print(f"  {'variant':<18} {'MB':>6} {'x faster':>8} " + " ".join(f"{'agree ' + task:>11} {'acc':>6}" for task in sets))
        for variant, row in report["variants"].items():
            cells = " ".join(f"{row['agreement'][task]:>11.3f} {row['accuracy'][task]:>6.3f}" for task in sets)
            print(f"  {variant:<18} {row['weights_mb']:>6.0f} {1 / row['latency_over_float32']:>8.2f} {cells}")
            if "float32_groups" in row:
                print(f"  {'':<18} float32: {', '.join(row['float32_groups']) or 'nothing'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gemma-3-270m,minilm", help="comma-separated, as tools/real_export.py names them")
    parser.add_argument("--cache", type=Path, default=cache_dir("real-export"), help="real_export.py's bundles (default %(default)s)")
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--items", type=int, default=300, help="test items per set")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated, from: " + ", ".join(PACK_SETS))
    parser.add_argument("--latency-items", type=int, default=30, help="items timed at batch 1 per variant")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (the machine is shared)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--split-groups", action="store_true",
                        help="mixed variants: each layer's attention and MLP split into input and output projections")
    parser.add_argument("--reuse-scan", type=Path, help="an earlier run's JSON: its mixed variants' group scan is reused")
    parser.add_argument("--batch-check", action="store_true",
                        help="also classify the items one at a time: the share of labels that differ from batch 8's")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    args = parser.parse_args()
    variants = tuple(variant for variant in args.variants.split(",") if variant)
    sets = tuple(task for task in args.sets.split(",") if task)
    if not sets or any(task not in PACK_SETS for task in sets):
        parser.error(f"--sets {args.sets!r}: choose from {list(PACK_SETS)}")
    unknown = [variant for variant in variants if variant not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    import onnxruntime

    warnings.filterwarnings("ignore", message=".*duplicate example")
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer advises pre-processing on every call
    earlier = {}
    if args.reuse_scan:
        earlier = {report["model"]: report["mixed"] for report in json.loads(args.reuse_scan.read_text())["reports"]
                   if "mixed" in report}
    reports = [run_model(name, args.cache, args.data_root, args.items, args.latency_items, args.threads, print, variants,
                         earlier.get(name), args.split_groups, sets, args.batch_check)
               for name in args.models.split(",") if name]
    print_table(reports)
    result = {"reports": reports, "threads": args.threads, "sets": list(sets), "onnxruntime": onnxruntime.__version__}
    print(f"wrote {write_results(args.out, result)}")


if __name__ == "__main__":
    main()
