"""int8 graphs: the exported float32 graph's weight matrices in int8 and their inputs quantized per token, kept only if
it classifies the packs' own labelled examples as the float32 graph does.

Every MatMul by a weight matrix (outside the packs' `scores` nodes) becomes an integer product: the weights int8 with a
scale per output column (per_channel; one per matrix otherwise), and each row of its input (one token of one item)
quantized to uint8 with that row's own range, computed in the graph (ReduceMax/ReduceMin, QuantizeLinear,
MatMulInteger: standard ONNX operators only, so the runtime's domain check and every ONNX Runtime binding accept the
graph). The token-embedding table (the largest Gather table) is int8 with a scale per row. The packs' scores stay
float32.

Why per token rather than onnxruntime's quantize_dynamic (the first int8 export): its DynamicQuantizeLinear takes one
scale for the whole input tensor, i.e. for every token of every item in the batch, so an item's int8 head vectors (and
labels) depended on the items batched with it: on the real bundles 2.3-5.3% (Gemma-3-270M) and 11.7-38%
(all-MiniLM-L6-v2) of a pack's labels differed between batch 8 and batch 1 (tools/results/int8_batch.json). With a row's own range an item's
quantization is its own (what remains is the float parts' rounding with padding, which int8 rounding can amplify:
up to 2.7% of Gemma's labels, none of MiniLM's), and more of the float32 labels stay (docs/export.md).

The int8 graph is not compared with the model value by value (int8 weights move head vectors by about 1e-2); it is
checked where it matters: the labels. Every pack classifies the examples it was built from (found in the given data
by the digests the pack keeps) with the float32 graph and with the int8 graph, both through the runtime's Classifier;
the share of equal labels must reach `min_agreement` (DEFAULT_MIN_AGREEMENT) or the export fails and writes nothing.
The packs' own examples sit near their centroids, so that check is optimistic; `check_items` (held-out items, labelled
or not: `savpack export --check-data`) are classified by every pack with both graphs too, and their agreement must
reach `min_agreement` as well.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from savpack_runtime import bundle as fmt
from savpack_runtime.classifier import Classifier, prompt_misfit
from savpack_runtime.items import Example
from savpack_runtime.pack import Pack

from ..errors import ExportError
from ..pipeline import training_examples
from . import onnx_graph

QUANTIZE_TYPES = ("int8",)
# Label agreement with the float32 graph on the packs' own examples below which an int8 graph is refused: the 98% issue
# 15 asks of int8. The own examples sit near their centroids, so agreement on them overstates agreement on new items:
# on the real bundles (docs/export.md, tools/results/real_export.json) Gemma-3-270M's int8 graph agreed on 100% of every
# pack's shots and on 96-99.7% of held-out items; all-MiniLM-L6-v2's on 89-100% of its shots (refused) and 73-99.2%.
DEFAULT_MIN_AGREEMENT = 0.98
QUANTIZATION_METHOD = "int8 weights, uint8 activations per token"
UINT8_LEVELS = 255.0
INT8_LIMIT = 127.0


@dataclass
class QuantizationReport:
    per_channel: bool
    min_agreement: float
    examples: dict[str, int] = field(default_factory=dict)  # pack -> its own examples found in the data
    agreement: dict[str, float] = field(default_factory=dict)  # pack -> share of labels equal to float32's
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # pack -> {"float32": ..., "int8": ...}
    # The held-out check (check_items), or None: {"items": n, "agreement": {pack: share}, "accuracy": {pack:
    # {"items": labelled items of the pack's classes, "float32": ..., "int8": ...}}}
    held_out: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"method": QUANTIZATION_METHOD, "weights": "int8", "activations": "uint8, a scale and offset per token",
                "per_channel": self.per_channel, "embedding": "int8, a scale per row",
                "min_agreement": self.min_agreement, "examples": self.examples,
                "agreement": self.agreement, "accuracy": self.accuracy, "held_out": self.held_out}


def packs_examples(packs: Sequence[Pack], names: Sequence[str], examples: Sequence[Example]) -> dict[str, list[Example]]:
    """Each pack's own labelled examples among `examples`; refuses a pack none of whose examples were given."""
    found = {name: training_examples(pack, examples) for pack, name in zip(packs, names)}
    missing = [name for name, chosen in found.items() if not chosen]
    if missing:
        raise ExportError(f"--quantize int8 checks each pack on the examples it was built from; none of the {len(examples)} "
                          f"given examples belong to pack(s) {missing} (give the pack's training data with --data)")
    return found


def check_items_fit(items: Sequence[Example], image_count: int) -> None:
    """Refuse held-out check items the bundle's prompt cannot take (before anything is exported), by the runtime's
    own rule."""
    for item in items:
        problem = prompt_misfit(item.text, item.images, image_count)
        if problem:
            raise ExportError(f"{item.source}: --check-data item: {problem}")


def quantize_bundle(folder: Path, names: Sequence[str], examples: dict[str, list[Example]], per_channel: bool = True,
                    min_agreement: float = DEFAULT_MIN_AGREEMENT, echo=lambda message: None,
                    check_items: Sequence[Example] = ()) -> QuantizationReport:
    """Replace the float32 graph of the bundle being written in `folder` by its int8 version, or raise ExportError
    (listing the agreement of every pack) when the labels move too much.

    examples: each pack's own examples (an empty dict: no such check); check_items: held-out items every pack
    classifies (labelled or not)."""
    if not 0.0 <= min_agreement <= 1.0:
        raise ExportError(f"--min-agreement {min_agreement} must be between 0 and 1")
    report = QuantizationReport(per_channel, min_agreement)
    reference, reference_held = _labels(folder, names, examples, check_items)
    graph = folder / fmt.GRAPH_FILE
    echo(f"quantizing the graph to int8 (weights {'per channel' if per_channel else 'per tensor'}, activations per token)")
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=folder.parent) as scratch:
        quantized = Path(scratch) / "quantized.onnx"
        quantize_graph(graph, quantized, per_channel)
        install_graph(quantized, folder)
    found, found_held = _labels(folder, names, examples, check_items)
    for name, items in examples.items():
        truth = [example.label for example in items]
        report.examples[name] = len(items)
        report.agreement[name] = _share(reference[name], found[name])
        report.accuracy[name] = {"float32": _share(reference[name], truth), "int8": _share(found[name], truth)}
    if check_items:
        report.held_out = {"items": len(check_items), "agreement": {}, "accuracy": {}}
        labels = {entry.name: set(entry.pack.labels) for entry in fmt.Bundle.load(folder, check_weights=False).packs}
        for name in names:
            report.held_out["agreement"][name] = _share(reference_held[name], found_held[name])
            # Accuracy only over the items labelled with one of the pack's classes (a file may serve several packs).
            labelled = [index for index, item in enumerate(check_items) if item.label in labels[name]]
            truth = [check_items[index].label for index in labelled]
            report.held_out["accuracy"][name] = {
                "items": len(labelled),
                "float32": _share([reference_held[name][index] for index in labelled], truth) if labelled else None,
                "int8": _share([found_held[name][index] for index in labelled], truth) if labelled else None}
    low = [f"{name}: {value:.1%} of its {report.examples[name]} own examples" for name, value in report.agreement.items()
           if value < min_agreement]
    if report.held_out:
        low += [f"{name}: {value:.1%} of the {len(check_items)} --check-data items"
                for name, value in report.held_out["agreement"].items() if value < min_agreement]
    if low:
        raise ExportError(f"the int8 graph labels items differently from the float32 graph ({'; '.join(low)}; required "
                          f"{min_agreement:.0%}); export in float32, or accept it with --min-agreement")
    _update_info(folder, quantization=report.to_dict())
    return report


def quantize_graph(source: Path, target: Path, per_channel: bool) -> None:
    """The int8 version of the graph `source` (weights in external data) written to `target`: quantize_per_token on
    every MatMul by a weight matrix outside the scoring nodes, and the token-embedding table."""
    import onnx

    model = onnx.load(str(source))  # the graph this export has just written, with its weights
    names = weight_matmuls(model)
    if not names:
        raise ExportError(f"{source}: the graph has no MatMul by a weight matrix to quantize")
    quantize_per_token(model, names, per_channel)
    onnx.save_model(model, str(target), save_as_external_data=True, location=target.name + ".data")


def weight_matmuls(model) -> list[str]:
    """Names of the MatMul nodes whose second input is a 2-D weight matrix (an initializer), outside the packs'
    scoring nodes (their centroids and probe stay float32), in graph order."""
    matrices = {tensor.name for tensor in model.graph.initializer if len(tensor.dims) == 2}
    scoring = set(onnx_graph.scoring_nodes(model))
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and node.input[1] in matrices and node.name not in scoring]


def matmuls_by_input(model, names: Sequence[str]) -> dict[str, list]:
    """The named MatMul nodes grouped by the tensor they multiply (q, k and v read one), in graph order."""
    chosen, groups = set(names), {}
    for node in model.graph.node:
        if node.name in chosen:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def embedding_gather(model):
    """The token-embedding lookup: the Gather of the largest 2-D initializer (None without one)."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    tables = [node for node in model.graph.node if node.op_type == "Gather" and node.input[0] in initializers
              and len(initializers[node.input[0]].dims) == 2]
    return max(tables, key=lambda node: initializers[node.input[0]].dims[0]) if tables else None


def int8_columns(weight: np.ndarray, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """weight (K, N) -> (int8 (K, N), float32 scale (N,)): symmetric, weight ~ int8 * scale, a scale per column
    (per_channel) or one for the whole matrix; a column of zeros gets scale 1."""
    weight = np.asarray(weight, dtype=np.float32)
    largest = np.abs(weight).max(axis=0) if per_channel else np.full(weight.shape[1], np.abs(weight).max())
    scale = np.where(largest > 0, largest / INT8_LIMIT, 1.0).astype(np.float32)
    return np.clip(np.round(weight / scale), -INT8_LIMIT, INT8_LIMIT).astype(np.int8), scale


def quantize_per_token(model, names: Sequence[str], per_channel: bool = True, embedding: bool = True) -> None:
    """Rewrite `model` in place: each named MatMul x . W becomes an integer product with W int8 (a scale per output
    column, or one per matrix) and x quantized per row. For a row x: lo = min(x), step = (max(x) - lo) / 255,
    u = QuantizeLinear((x - lo) / step) in uint8, and x . W ~ step * (u . Wq) * scale + lo * (column sums of the
    dequantized W). MatMuls that read the same input share its quantization. With `embedding`, the token-embedding
    table (embedding_gather's) becomes int8 with a scale per row."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    by_input = matmuls_by_input(model, names)
    added = [numpy_helper.from_array(np.array(UINT8_LEVELS, np.float32), "q8.levels"),
             numpy_helper.from_array(np.array(1e-30, np.float32), "q8.tiny"),  # a constant row: step 1e-30, u = 0
             numpy_helper.from_array(np.array([-1], np.int64), "q8.last_axis"),
             numpy_helper.from_array(np.array(1.0, np.float32), "q8.one"),
             numpy_helper.from_array(np.array(0, np.uint8), "q8.zero")]
    replace: dict[str, list] = {}
    for group, (source, nodes) in enumerate(by_input.items()):
        p = f"q8.{group}"
        row_quantization = [
            helper.make_node("ReduceMax", [source, "q8.last_axis"], [f"{p}.hi"], keepdims=1, name=f"{p}.hi"),
            helper.make_node("ReduceMin", [source, "q8.last_axis"], [f"{p}.lo"], keepdims=1, name=f"{p}.lo"),
            helper.make_node("Sub", [f"{p}.hi", f"{p}.lo"], [f"{p}.range"], name=f"{p}.range"),
            helper.make_node("Div", [f"{p}.range", "q8.levels"], [f"{p}.step0"], name=f"{p}.step0"),
            helper.make_node("Max", [f"{p}.step0", "q8.tiny"], [f"{p}.step"], name=f"{p}.step"),
            helper.make_node("Sub", [source, f"{p}.lo"], [f"{p}.shifted"], name=f"{p}.shifted"),
            helper.make_node("Div", [f"{p}.shifted", f"{p}.step"], [f"{p}.scaled"], name=f"{p}.scaled"),
            helper.make_node("QuantizeLinear", [f"{p}.scaled", "q8.one", "q8.zero"], [f"{p}.u8"], name=f"{p}.u8")]
        for index, node in enumerate(nodes):
            q = f"{p}.{index}"
            integers, scale = int8_columns(numpy_helper.to_array(initializers[node.input[1]]), per_channel)
            sums = (integers.astype(np.float64) * scale).sum(axis=0).astype(np.float32)  # (N,)
            added += [numpy_helper.from_array(integers, f"{q}.w"), numpy_helper.from_array(scale, f"{q}.scale"),
                      numpy_helper.from_array(sums, f"{q}.sums")]
            replace[node.name] = (row_quantization if index == 0 else []) + [
                helper.make_node("MatMulInteger", [f"{p}.u8", f"{q}.w", "q8.zero"], [f"{q}.i32"], name=f"{q}.matmul"),
                helper.make_node("Cast", [f"{q}.i32"], [f"{q}.f"], to=TensorProto.FLOAT, name=f"{q}.cast"),
                helper.make_node("Mul", [f"{q}.f", f"{p}.step"], [f"{q}.rows"], name=f"{q}.rows"),
                helper.make_node("Mul", [f"{q}.rows", f"{q}.scale"], [f"{q}.product"], name=f"{q}.product"),
                helper.make_node("Mul", [f"{p}.lo", f"{q}.sums"], [f"{q}.offset"], name=f"{q}.offset"),
                helper.make_node("Add", [f"{q}.product", f"{q}.offset"], [node.output[0]], name=f"{q}.add")]
    node = embedding_gather(model) if embedding else None
    if node is not None:
        table = numpy_helper.to_array(initializers[node.input[0]])  # (vocabulary, hidden)
        integers, rows = int8_columns(table.T)  # a scale per row of the table
        added += [numpy_helper.from_array(np.ascontiguousarray(integers.T), "q8.table"),
                  numpy_helper.from_array(rows[:, None], "q8.table_scale")]
        replace[node.name] = [
            helper.make_node("Gather", ["q8.table", node.input[1]], ["q8.rows"], axis=0, name="q8.rows"),
            helper.make_node("Gather", ["q8.table_scale", node.input[1]], ["q8.row_scales"], axis=0, name="q8.row_scales"),
            helper.make_node("Cast", ["q8.rows"], ["q8.rows_float"], to=TensorProto.FLOAT, name="q8.rows_float"),
            helper.make_node("Mul", ["q8.rows_float", "q8.row_scales"], [node.output[0]], name="q8.embedding")]
    replace_nodes(model, replace, added)


def replace_nodes(model, replace: dict[str, list], added: list) -> None:
    """In place: each node named in `replace` swapped for its list of nodes (in graph order), the `added`
    initializers appended, and every initializer no node reads any more dropped."""
    nodes = [new for node in model.graph.node for new in replace.get(node.name, [node])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    read = {name for node in model.graph.node for name in node.input}
    kept = [tensor for tensor in list(model.graph.initializer) + added if tensor.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def install_graph(quantized: Path, folder: Path) -> None:
    """Put the quantized graph in place of the bundle's (graph.onnx and its one weights file, as `savpack export`
    writes them), carrying over the metadata, and record it in bundle.json."""
    import onnx

    graph = folder / fmt.GRAPH_FILE
    original = onnx.load(str(graph), load_external_data=False)
    model = onnx.load(str(quantized), load_external_data=False)
    onnx_graph.finish(model, {entry.key: entry.value for entry in original.metadata_props})
    del original
    for name in (fmt.GRAPH_FILE, fmt.GRAPH_DATA_FILE):
        (folder / name).unlink()
    onnx_graph.save(model, graph, quantized.parent)
    data = folder / fmt.GRAPH_DATA_FILE
    _update_info(folder, sha256=fmt.file_sha256(graph), data_bytes=data.stat().st_size, data_sha256=fmt.file_sha256(data),
                 weights="int8")


def _update_info(folder: Path, **graph_fields: Any) -> None:
    path = folder / fmt.BUNDLE_FILE
    info = json.loads(path.read_text(encoding="utf-8"))
    info["graph"].update(graph_fields)
    path.write_text(json.dumps(info, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _share(found: Sequence[Any], expected: Sequence[Any]) -> float:
    return float(np.mean([a == b for a, b in zip(found, expected)]))


def _labels(folder: Path, names: Sequence[str], examples: dict[str, list[Example]],
            check_items: Sequence[Example]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each pack's labels of its own examples, and every pack's labels of the check items, through the runtime's
    Classifier on the bundle as it now is."""
    classifier = Classifier.load(folder)

    def classify(items: Sequence[Example]):
        return classifier.classify_batch([{"text": item.text, "images": list(item.images)} for item in items])

    own = {name: [result.by_pack[name].label for result in classify(items)] for name, items in examples.items()}
    results = classify(check_items) if check_items else []
    return own, {name: [result.by_pack[name].label for result in results] for name in names}
