"""int8 graphs: the exported float32 graph's weight matrices in int8 and their inputs quantized per token, kept only if
it classifies the packs' own labelled examples as the float32 graph does.

Every MatMul by a weight matrix (outside the packs' `scores` nodes; a Gemm too, its bias added back) becomes an
integer product: the weights int8 with a scale per output column (per_channel; one per matrix otherwise), and each
row of its input (one token of one item) quantized to uint8 with that row's own range, computed in the graph
(ReduceMax/ReduceMin, QuantizeLinear, MatMulInteger: standard ONNX operators only, so the runtime's domain check and
every ONNX Runtime binding accept the graph). Before its rounding each row is rotated in blocks by an orthonormal Hadamard matrix, and the weights by its
transpose (rotation_block, hadamard, rotate_rows): a row's step is its range over 255, and the rotation spreads its few
large values over their block, so the step shrinks. The token-embedding table (the largest Gather table) is int8 with
a scale per row. The packs' scores stay float32.

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

Mixed precision (keep_float "auto", the default when the packs' own examples are given): not every weight MatMul
need be int8. The MatMuls fall in groups, those reading one tensor (a layer's q, k and v; its o; its MLP's gate and
up; its down), plus the token-embedding table. A graph is judged on the packs' own examples (ShotJudge): its
disturbance of a pack is the mean |change| of the lead of each example's most probable class over its runner-up in
the pack's log-probabilities, over the mean float32 lead: the share of a typical decision's lead the rounding eats,
whether a vote or a probe decides. The all-int8 graph is kept if it keeps every own example's label in every pack and
disturbs no pack by more than DISTURBANCE_BUDGET; otherwise each group alone is made int8 and judged, and groups are
made int8 from the least disturbing on, keeping the longest such prefix within the same bounds (choose_int8_groups);
the rest stay float32. Why: without the rotation a few projections (the first layers' MLP, some query projections,
the embedding table) moved most labels, and the budget then had to keep them float32; with it, Gemma-3-270M's
all-int8 graph keeps 98% of held-out labels on the five shared sets, and all-MiniLM-L6-v2 still needs half its groups
in float32 (docs/export.md, docs/decisions.md).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from savpack_runtime import bundle as fmt
from savpack_runtime import graph_inputs
from savpack_runtime.classifier import Classifier, prompt_misfit
from savpack_runtime.items import Example
from savpack_runtime.pack import Pack
from savpack_runtime.session import GraphSession
from savpack_runtime.vote import cosine_to_centroids

from ..errors import ExportError
from ..pipeline import training_examples
from . import onnx_graph

QUANTIZE_TYPES = ("int8",)
# Label agreement with the float32 graph on the packs' own examples below which an int8 graph is refused: the 98% issue
# 15 asks of int8. The own examples sit near their centroids, so agreement on them overstates agreement on new items:
# on the real bundles (docs/export.md, tools/results/real_export.json) Gemma-3-270M's all-int8 graph agreed on 100% of
# every pack's shots and on 98.6-99.9% of held-out items; all-MiniLM-L6-v2's on 97.5-100% of its shots (refused) and
# 88.6-99.5% (with keep_float "auto": 100% of the shots and 98.6-100% of held-out items for both).
DEFAULT_MIN_AGREEMENT = 0.98
QUANTIZATION_METHOD = "int8 weights, uint8 activations per token, rows rotated in Hadamard blocks"
UINT8_LEVELS = 255.0
INT8_LIMIT = 127.0
KEEP_FLOAT_CHOICES = ("auto", "none")
# keep_float "auto": the int8 groups together may disturb each pack's own examples by at most this share of their
# typical decision lead (ShotJudge's "disturbance"). Read off all-MiniLM-L6-v2's real bundle among 0.01-0.05 (docs/export.md
# "How the scan's rule was found"): the largest budget that kept 98% of held-out labels on every set; not derived.
DISTURBANCE_BUDGET = 0.02
SHOT_AGREEMENT = 1.0  # and every own example keeps its float32 label in every pack
EMBEDDING_GROUP = "embedding"  # the token-embedding table, a group of its own
# Rows are rotated in blocks of this many values before their uint8 rounding (quantize_per_token): a Hadamard block
# spreads a few large values over the block, so the row's range, hence its step, shrinks. 128 divides the widths of
# the families here; a width it does not divide takes the largest power of two that does, none below 16.
ROTATION_BLOCK = 128
MIN_ROTATION_BLOCK = 16


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
    keep_float: str = "none"
    # keep_float "auto": choose_int8_groups's record (groups, disturbance alone, which stay float32), else None
    mixed: dict[str, Any] | None = None

    @property
    def float32_groups(self) -> list[str]:
        return self.mixed["float32_groups"] if self.mixed else []

    def to_dict(self) -> dict[str, Any]:
        embedding = "float32" if EMBEDDING_GROUP in self.float32_groups else "int8, a scale per row"
        return {"method": QUANTIZATION_METHOD, "weights": "int8", "activations": "uint8, a scale and offset per token",
                "per_channel": self.per_channel, "embedding": embedding, "keep_float": self.keep_float,
                "rotation": f"block Hadamard, blocks of up to {ROTATION_BLOCK} values (none below {MIN_ROTATION_BLOCK})",
                "mixed": self.mixed, "min_agreement": self.min_agreement, "examples": self.examples,
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


def check_keep_float(keep_float: str | None, examples: dict[str, list[Example]]) -> str:
    """keep_float as given, or its default: "auto" when the packs' own examples are given (the scan needs them),
    else "none"."""
    if keep_float is None:
        return "auto" if examples else "none"
    if keep_float not in KEEP_FLOAT_CHOICES:
        raise ExportError(f"--keep-float {keep_float!r} is not one of {list(KEEP_FLOAT_CHOICES)}")
    if keep_float == "auto" and not examples:
        raise ExportError("--keep-float auto chooses the float32 groups on the packs' own examples: give the packs' "
                          "training data with --data, or use --keep-float none")
    return keep_float


def quantize_bundle(folder: Path, names: Sequence[str], examples: dict[str, list[Example]], per_channel: bool = True,
                    min_agreement: float = DEFAULT_MIN_AGREEMENT, echo=lambda message: None,
                    check_items: Sequence[Example] = (), keep_float: str | None = None) -> QuantizationReport:
    """Replace the float32 graph of the bundle being written in `folder` by its int8 version, or raise ExportError
    (listing the agreement of every pack) when the labels move too much.

    examples: each pack's own examples (an empty dict: no such check); check_items: held-out items every pack
    classifies (labelled or not); keep_float: "auto" (the MatMul groups that disturb the packs' own examples most
    stay float32, see the module's docstring), "none" (every weight MatMul int8) or None (check_keep_float's default)."""
    if not 0.0 <= min_agreement <= 1.0:
        raise ExportError(f"--min-agreement {min_agreement} must be between 0 and 1")
    report = QuantizationReport(per_channel, min_agreement, keep_float=check_keep_float(keep_float, examples))
    reference, reference_held = _labels(folder, names, examples, check_items)
    graph = folder / fmt.GRAPH_FILE
    import onnx

    groups = matmul_groups(onnx.load(str(graph), load_external_data=False))
    if not groups:
        raise ExportError(f"{graph}: the graph has no MatMul by a weight matrix to quantize")
    int8_groups = list(groups)
    if report.keep_float == "auto":
        echo(f"choosing the int8 groups on the packs' {sum(len(items) for items in examples.values())} own examples: "
             f"every group int8, else each of the {len(groups)} MatMul groups alone")
        judge = ShotJudge(folder, {name: _runtime_items(items) for name, items in examples.items()},
                          lambda model, members, embedding: quantize_per_token(model, members, per_channel, embedding,
                                                                              base_dir=folder))
        report.mixed = choose_int8_groups(judge, groups, DISTURBANCE_BUDGET)
        int8_groups = report.mixed["int8_groups"]
        echo(f"{len(report.mixed['float32_groups'])} of {len(groups)} groups stay float32: "
             + (", ".join(report.mixed["float32_groups"]) or "none"))
        if not int8_groups:
            raise ExportError("no MatMul group can be int8 without changing a label of the packs' own examples; export "
                              "in float32 (or --fp16), or make every group int8 with --keep-float none")
    echo(f"quantizing the graph to int8 (weights {'per channel' if per_channel else 'per tensor'}, activations per token, "
         "rows rotated)")
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=folder.parent) as scratch:
        quantized = Path(scratch) / "quantized.onnx"
        quantize_graph(graph, quantized, per_channel, [name for group in int8_groups for name in groups[group]],
                       EMBEDDING_GROUP in int8_groups)
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


def quantize_graph(source: Path, target: Path, per_channel: bool, names: Sequence[str] | None = None,
                   embedding: bool = True) -> None:
    """The int8 version of the graph `source` (weights in external data) written to `target`: quantize_per_token on
    the named MatMuls (None: every MatMul by a weight matrix outside the scoring nodes) and, with `embedding`, the
    token-embedding table."""
    import onnx

    model = onnx.load(str(source))  # the graph this export has just written, with its weights
    names = weight_matmuls(model) if names is None else names
    if not names and not (embedding and embedding_gather(model) is not None):
        raise ExportError(f"{source}: the graph has no MatMul by a weight matrix to quantize")
    quantize_per_token(model, names, per_channel, embedding)
    onnx.save_model(model, str(target), save_as_external_data=True, location=target.name + ".data")


def weight_matmuls(model) -> list[str]:
    """Names of the nodes that multiply by a 2-D weight matrix (an initializer, their second input): MatMul, and Gemm
    without a transposed first input (GPT-2's Conv1D exports as one: a MatMul with a bias), outside the packs' scoring
    nodes (their centroids and probe stay float32), in graph order."""
    matrices = {tensor.name for tensor in model.graph.initializer if len(tensor.dims) == 2}
    scoring = set(onnx_graph.scoring_nodes(model))
    return [node.name for node in model.graph.node
            if node.name not in scoring and len(node.input) > 1 and node.input[1] in matrices
            and (node.op_type == "MatMul" or node.op_type == "Gemm" and not _attributes(node).get("transA", 0))]


def _attributes(node) -> dict[str, Any]:
    from onnx import helper

    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def product_weight(node, initializers: dict[str, Any], base_dir: str | Path = "") -> np.ndarray:
    """(K, N): the matrix W with node(x) = x . W (+ a Gemm's bias): a MatMul's weight, or a Gemm's with its transB
    and alpha applied."""
    from onnx import numpy_helper

    weight = numpy_helper.to_array(initializers[node.input[1]], str(base_dir))
    if node.op_type == "Gemm":
        attributes = _attributes(node)
        weight = (weight.T if attributes.get("transB", 0) else weight) * np.float32(attributes.get("alpha", 1.0))
    return weight


def matmuls_by_input(model, names: Sequence[str]) -> dict[str, list]:
    """The named MatMul (or Gemm) nodes grouped by the tensor they multiply (q, k and v read one), in graph order."""
    chosen, groups = set(names), {}
    for node in model.graph.node:
        if node.name in chosen:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def matmul_groups(model) -> dict[str, list[str]]:
    """The weight MatMuls in groups that read one tensor (quantize_per_token quantizes that tensor once for them),
    each named by its first MatMul, in graph order; then the token-embedding table, as EMBEDDING_GROUP with no
    MatMul, if the graph has one."""
    groups = {nodes[0].name: [node.name for node in nodes]
              for nodes in matmuls_by_input(model, weight_matmuls(model)).values()}
    if embedding_gather(model) is not None:
        groups[EMBEDDING_GROUP] = []
    return groups


class ShotJudge:
    """The packs' own examples through the float32 graph of the bundle in `folder` and through graphs with some
    weight MatMuls int8 (`rewrite(model, names, embedding)` turns the named MatMuls, and the embedding table if
    `embedding`, of a model loaded without its weights into their int8 form, in place), compared pack by pack.

    examples: pack -> its own examples in any form Classifier.classify_batch takes."""

    def __init__(self, folder: Path, examples: dict[str, list[Any]], rewrite, threads: int | None = None):
        self.folder, self.rewrite, self.threads = folder, rewrite, threads
        self.classifier = Classifier.load(folder, threads=threads)
        self.items = [item for items in examples.values() for item in items]
        starts = np.cumsum([0] + [len(items) for items in examples.values()])
        self.rows = {name: np.arange(start, start + len(items)) for (name, items), start in zip(examples.items(), starts)}
        self.float32 = self._decisions()

    def _decisions(self) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """pack -> (labels (S,), probabilities (S, C), cosines (S, k, C)) on its own examples."""
        outputs = self.classifier.graph_outputs(self.items)
        found = {}
        for entry in self.classifier.bundle.packs:
            rows = self.rows[entry.name]
            decision = self.classifier.decision_from_outputs(entry, outputs)
            vectors = outputs[graph_inputs.OUTPUT_NAME][rows][:, entry.positions]  # (S, k, D)
            found[entry.name] = (decision.predictions[rows], np.asarray(decision.probabilities, np.float64)[rows],
                                 cosine_to_centroids(vectors, entry.pack.centroids).astype(np.float64))
        return found

    def judge(self, names: Sequence[str], embedding: bool) -> dict[str, dict[str, float]]:
        """pack -> {"agreement": the share of its examples keeping their float32 label; "disturbance": the mean
        |change| of the lead of each example's most probable class over the runner-up (float32's two) in the pack's
        log-probabilities, over the mean float32 lead: the share of a typical decision's lead the int8 rounding eats,
        whatever decides (vote or probe: for a probe the lead is the difference of its logits; in log space the
        confident decisions a pack makes on its own examples do not saturate); "head_disturbance": the same for each
        head's cosines to its two most similar centroids; "head_agreement": the share of (example, head) votes
        unchanged}, with the named MatMuls (and the embedding table if `embedding`) int8."""
        import onnx

        model = onnx.load(str(self.folder / fmt.GRAPH_FILE), load_external_data=False)
        self.rewrite(model, names, embedding)
        path = self.folder / ".int8-scan.onnx"  # beside the weights file its float32 tensors still refer to
        data = path.with_name(path.name + ".data")  # the int8 tensors: a large model's would pass protobuf's 2 GB
        session = self.classifier.session
        try:
            onnx.save_model(model, str(path), save_as_external_data=True, location=data.name)
            del model
            self.classifier.session = GraphSession(path, threads=self.threads)
            found = self._decisions()
        finally:
            self.classifier.session = session
            path.unlink(missing_ok=True)
            data.unlink(missing_ok=True)
        report = {}
        for name, (labels, probabilities, cosines) in self.float32.items():
            int8_labels, int8_probabilities, int8_cosines = found[name]
            ranked = np.argsort(probabilities, axis=1)  # the float32 lead's two classes, followed in int8
            rows, top, runner_up = np.arange(len(labels)), ranked[:, -1], ranked[:, -2]
            log_lead = _log(probabilities[rows, top]) - _log(probabilities[rows, runner_up])  # (S,)
            int8_log_lead = _log(int8_probabilities[rows, top]) - _log(int8_probabilities[rows, runner_up])
            ordered = np.sort(cosines, axis=-1)
            head_lead = ordered[..., -1] - ordered[..., -2]
            report[name] = {"agreement": float(np.mean(int8_labels == labels)),
                            "disturbance": float(np.mean(np.abs(int8_log_lead - log_lead))
                                                 / max(float(np.mean(log_lead)), 1e-12)),
                            "head_disturbance": float(np.mean(np.abs(int8_cosines - cosines))
                                                      / max(float(np.mean(head_lead)), 1e-12)),
                            "head_agreement": float(np.mean(int8_cosines.argmax(-1) == cosines.argmax(-1)))}
        return report


def choose_int8_groups(judge: ShotJudge, groups: dict[str, list[str]], budget: float | None,
                       progress: bool = True) -> dict[str, Any]:
    """Sensitivity-guided mixed precision on the packs' own examples. Each group (groups: name -> its MatMuls;
    EMBEDDING_GROUP the embedding table) is made int8 alone and judged (the largest disturbance over the packs);
    groups are then made int8 from the least disturbing on, and the longest such prefix is kept whose graph keeps
    every example's label in every pack (SHOT_AGREEMENT) and disturbs no pack by more than `budget` (None: no such
    bound). The prefix is found by bisection, which assumes a longer prefix disturbs at least as much; every group
    int8 is tried first. Returns the record bundle.json keeps: the groups' disturbance alone, the int8 and the float32
    groups, the prefixes judged."""
    from tqdm.auto import tqdm

    def judged(chosen: Sequence[str]) -> dict[str, dict[str, float]]:
        return judge.judge([name for group in chosen for name in groups[group]], EMBEDDING_GROUP in chosen)

    def worst(found: dict[str, dict[str, float]]) -> float:
        return max(value["disturbance"] for value in found.values())

    prefixes = {len(groups): judged(list(groups))}  # the all-int8 graph

    def fits(count: int) -> bool:
        if count not in prefixes:
            prefixes[count] = judged(order[:count])
        return all(value["agreement"] >= SHOT_AGREEMENT and (budget is None or value["disturbance"] <= budget)
                   for value in prefixes[count].values())

    order, alone = list(groups), {}
    low = high = len(order)  # fits(low) holds; find the largest count that does
    if not fits(len(order)):
        # disable=None: tqdm draws only on a terminal, so logs and pipes get no bar fragments.
        for group in tqdm(groups, desc="int8 scan", unit="group", disable=None if progress else True, leave=False):
            alone[group] = judged([group])
        order = sorted(groups, key=lambda group: worst(alone[group]))
        prefixes = {0: {}, len(order): prefixes[len(order)]}
        low = 0
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    chosen = set(order[:low])
    return {"budget": budget, "shot_agreement": SHOT_AGREEMENT,
            "disturbance_alone": {group: round(worst(alone[group]), 6) for group in alone},
            "int8_groups": [group for group in groups if group in chosen],
            "float32_groups": [group for group in groups if group not in chosen],
            "prefixes": {str(count): {pack: {key: round(value, 6) for key, value in found.items()}
                                      for pack, found in prefixes[count].items()}
                         for count in sorted(prefixes) if count}}


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


def rotation_block(width: int) -> int:
    """The Hadamard block for rows of `width` values: the largest power of two up to ROTATION_BLOCK dividing it,
    0 (no rotation) below MIN_ROTATION_BLOCK."""
    block = ROTATION_BLOCK
    while block >= MIN_ROTATION_BLOCK and width % block:
        block //= 2
    return block if block >= MIN_ROTATION_BLOCK else 0


def hadamard(size: int) -> np.ndarray:
    """The orthonormal Hadamard matrix of a power-of-two size (Sylvester's construction), float32 (size, size)."""
    matrix = np.ones((1, 1))
    while len(matrix) < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return (matrix / np.sqrt(size)).astype(np.float32)


def rotate_rows(weight: np.ndarray, block: int) -> np.ndarray:
    """R^T W for R block-diagonal with hadamard(block) blocks: weight (K, N) -> (K, N), each run of `block` rows
    mixed, so that (x R) . (R^T W) = x . W."""
    rows, columns = weight.shape
    blocks = np.asarray(weight, np.float64).reshape(rows // block, block, columns)  # (K / block, block, N)
    return (hadamard(block).T.astype(np.float64) @ blocks).reshape(rows, columns).astype(np.float32)


def quantize_per_token(model, names: Sequence[str], per_channel: bool = True, embedding: bool = True,
                       base_dir: str | Path = "", rotate: bool = True) -> None:
    """Rewrite `model` in place: each named MatMul x . W becomes an integer product with W int8 (a scale per output
    column, or one per matrix) and x quantized per row. For a row x: lo = min(x), step = (max(x) - lo) / 255,
    u = QuantizeLinear((x - lo) / step) in uint8, and x . W ~ step * (u . Wq) * scale + lo * (column sums of the
    dequantized W). MatMuls that read the same input share its quantization. With `rotate`, each row x is first
    rotated, x R with R block-diagonal Hadamard (rotation_block), and W replaced by R^T W before its rounding. With
    `embedding`, the token-embedding table (embedding_gather's) becomes int8 with a scale per row. base_dir: where
    the weights of a model loaded without its external data lie (only the tensors rewritten are read)."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    by_input = matmuls_by_input(model, names)
    added = [numpy_helper.from_array(np.array(UINT8_LEVELS, np.float32), "q8.levels"),
             numpy_helper.from_array(np.array(1e-30, np.float32), "q8.tiny"),  # a constant row: step 1e-30, u = 0
             numpy_helper.from_array(np.array([-1], np.int64), "q8.last_axis"),
             numpy_helper.from_array(np.array(1.0, np.float32), "q8.one"),
             numpy_helper.from_array(np.array(0, np.uint8), "q8.zero")]
    replace: dict[str, list] = {}
    rotations: set[str] = set()
    for group, (source, nodes) in enumerate(by_input.items()):
        p = f"q8.{group}"
        weights = [product_weight(node, initializers, base_dir) for node in nodes]  # (K, N) each
        block = rotation_block(weights[0].shape[0]) if rotate else 0
        rows = source
        row_quantization = []
        if block:
            # x . W = (x R) . (R^T W) for R orthogonal: the rotated rows spread an outlier channel over `block`
            # channels, so a row's range (its uint8 step) shrinks towards its spread.
            rotation = f"q8.rotation{block}"
            if rotation not in rotations:
                rotations.add(rotation)
                added += [numpy_helper.from_array(hadamard(block), rotation),
                          numpy_helper.from_array(np.array([-1, block], np.int64), f"{rotation}.blocks")]
            row_quantization = [
                helper.make_node("Shape", [source], [f"{p}.shape"], name=f"{p}.shape"),
                helper.make_node("Reshape", [source, f"{rotation}.blocks"], [f"{p}.blocks"], name=f"{p}.blocks"),
                helper.make_node("MatMul", [f"{p}.blocks", rotation], [f"{p}.rotated_blocks"], name=f"{p}.rotate"),
                helper.make_node("Reshape", [f"{p}.rotated_blocks", f"{p}.shape"], [f"{p}.rotated"], name=f"{p}.rotated")]
            rows = f"{p}.rotated"
            weights = [rotate_rows(weight, block) for weight in weights]
        row_quantization += [
            helper.make_node("ReduceMax", [rows, "q8.last_axis"], [f"{p}.hi"], keepdims=1, name=f"{p}.hi"),
            helper.make_node("ReduceMin", [rows, "q8.last_axis"], [f"{p}.lo"], keepdims=1, name=f"{p}.lo"),
            helper.make_node("Sub", [f"{p}.hi", f"{p}.lo"], [f"{p}.range"], name=f"{p}.range"),
            helper.make_node("Div", [f"{p}.range", "q8.levels"], [f"{p}.step0"], name=f"{p}.step0"),
            helper.make_node("Max", [f"{p}.step0", "q8.tiny"], [f"{p}.step"], name=f"{p}.step"),
            helper.make_node("Sub", [rows, f"{p}.lo"], [f"{p}.shifted"], name=f"{p}.shifted"),
            helper.make_node("Div", [f"{p}.shifted", f"{p}.step"], [f"{p}.scaled"], name=f"{p}.scaled"),
            helper.make_node("QuantizeLinear", [f"{p}.scaled", "q8.one", "q8.zero"], [f"{p}.u8"], name=f"{p}.u8")]
        for index, (node, weight) in enumerate(zip(nodes, weights)):
            q = f"{p}.{index}"
            integers, scale = int8_columns(weight, per_channel)
            sums = (integers.astype(np.float64) * scale).sum(axis=0).astype(np.float32)  # (N,)
            added += [numpy_helper.from_array(integers, f"{q}.w"), numpy_helper.from_array(scale, f"{q}.scale"),
                      numpy_helper.from_array(sums, f"{q}.sums")]
            replace[node.name] = (row_quantization if index == 0 else []) + [
                helper.make_node("MatMulInteger", [f"{p}.u8", f"{q}.w", "q8.zero"], [f"{q}.i32"], name=f"{q}.matmul"),
                helper.make_node("Cast", [f"{q}.i32"], [f"{q}.f"], to=TensorProto.FLOAT, name=f"{q}.cast"),
                helper.make_node("Mul", [f"{q}.f", f"{p}.step"], [f"{q}.rows"], name=f"{q}.rows"),
                helper.make_node("Mul", [f"{q}.rows", f"{q}.scale"], [f"{q}.product"], name=f"{q}.product"),
                helper.make_node("Mul", [f"{p}.lo", f"{q}.sums"], [f"{q}.offset"], name=f"{q}.offset")]
            bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""  # a Gemm's C, beta C
            beta = float(_attributes(node).get("beta", 1.0)) if bias else 1.0
            if beta != 1.0:
                added.append(numpy_helper.from_array(np.array(beta, np.float32), f"{q}.beta"))
                replace[node.name].append(helper.make_node("Mul", [bias, f"{q}.beta"], [f"{q}.bias"], name=f"{q}.bias"))
                bias = f"{q}.bias"
            replace[node.name].append(helper.make_node("Add", [f"{q}.product", f"{q}.offset"],
                                                       [f"{q}.sum" if bias else node.output[0]], name=f"{q}.add"))
            if bias:
                replace[node.name].append(helper.make_node("Add", [f"{q}.sum", bias], [node.output[0]], name=f"{q}.add_bias"))
    node = embedding_gather(model) if embedding else None
    if node is not None:
        table = numpy_helper.to_array(initializers[node.input[0]], str(base_dir))  # (vocabulary, hidden)
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
        return classifier.classify_batch(_runtime_items(items))

    own = {name: [result.by_pack[name].label for result in classify(items)] for name, items in examples.items()}
    results = classify(check_items) if check_items else []
    return own, {name: [result.by_pack[name].label for result in results] for name in names}


def _log(probabilities: np.ndarray) -> np.ndarray:
    # float32 probabilities of a confident decision can underflow to 0; a floor keeps their log finite.
    return np.log(np.maximum(probabilities, 1e-30))


def _runtime_items(examples: Sequence[Example]) -> list[dict[str, Any]]:
    return [{"text": example.text, "images": list(example.images)} for example in examples]
