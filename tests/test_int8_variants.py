"""tools/int8_variants.py on a golden bundle: the weight matrices it finds per layer, and each variant's graph."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import int8_variants
from savpack_runtime import Classifier

GOLDEN = Path(__file__).resolve().parent.parent / "exported" / "bundles" / "qwen2"


def _operators(folder: Path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(folder / "graph.onnx"), load_external_data=False).graph.node)


def test_weight_matrices_are_found_per_layer_attention_first():
    """Layers 0-1 whole (q, k, v, o, then the MLP's gate, up, down), layer 2 (the deepest) only q, k, v."""
    matmuls = int8_variants.weight_matmuls(onnx.load(str(GOLDEN / "bundle" / "graph.onnx"), load_external_data=False))
    assert [(layer, attention) for _, layer, attention in matmuls] == \
        [(layer, position < 4) for layer in (0, 1) for position in range(7)] + [(2, True)] * 3
    assert not any(name.startswith("/scores") for name, _, _ in matmuls)


@pytest.mark.parametrize("variant, integer_matmuls", [("default", 17), ("mlp-only", 6), ("attention-only", 11),
                                                      ("last-layer-float", 14), ("weights-only", 0)])
def test_each_variant_quantizes_what_it_says_and_still_classifies(variant, integer_matmuls, tmp_path):
    int8_variants.quantize_variant(GOLDEN / "bundle", tmp_path / variant, variant)
    operators = _operators(tmp_path / variant)
    assert operators["MatMulInteger"] == integer_matmuls
    assert operators["DequantizeLinear"] >= (17 if variant == "weights-only" else 0)
    assert json.loads((tmp_path / variant / "bundle.json").read_text())["graph"]["weights"] == "int8"
    items = [json.loads(line)["text"] for line in (GOLDEN / "items.jsonl").read_text().splitlines()]
    found = [result.label for result in Classifier.load(tmp_path / variant, threads=1).classify_batch(items)]
    expected = [result.label for result in Classifier.load(GOLDEN / "bundle", threads=1).classify_batch(items)]
    assert np.mean([a == b for a, b in zip(found, expected)]) >= 0.6  # a working graph (these are random weights)


@pytest.mark.parametrize("variant, operator, count", [("per-token", "MatMulInteger", 17), ("per-token-unrotated", "MatMulInteger", 17),
                                                      ("per-token-smooth", "MatMulInteger", 17),
                                                      ("nbits8-b32", "MatMulNBits", 17), ("static-minmax", "QuantizeLinear", 17),
                                                      ("static-percentile", "QuantizeLinear", 17)])
def test_the_measured_alternatives_quantize_every_weight_matrix_and_classify(variant, operator, count, tmp_path):
    """The variants measured against the default: each weight MatMul replaced (the scores never), labels kept on the
    golden items, head vectors near float32's. per-token: one activation quantization per distinct input (q, k, v
    share theirs)."""
    items = [json.loads(line)["text"] for line in (GOLDEN / "items.jsonl").read_text().splitlines()]
    int8_variants.quantize_variant(GOLDEN / "bundle", tmp_path / variant, variant, items)
    operators = _operators(tmp_path / variant)
    # Left as MatMul: attention's two per layer and the scores' (QDQ keeps the weight MatMuls, fed by DequantizeLinear);
    # per-token adds one rotation per quantized input.
    rotations = 9 if variant in ("per-token", "per-token-smooth") else 0
    assert operators[operator] >= count and operators["MatMul"] == (24 if variant.startswith("static") else 7) + rotations
    if variant.startswith("per-token"):
        assert operators["QuantizeLinear"] == 9 and operators["DequantizeLinear"] == 0
    with int8_variants.contrib_operators(variant.startswith("nbits")):
        classifier = Classifier.load(tmp_path / variant, threads=1)
    reference = Classifier.load(GOLDEN / "bundle", threads=1)
    expected, found = reference.head_vectors(items), classifier.head_vectors(items)
    assert np.abs(found - expected).max() < 0.05 * np.abs(expected).max()
    assert np.mean([a.label == b.label for a, b in zip(classifier.classify_batch(items), reference.classify_batch(items))]) >= 0.6


def test_mixed_groups_are_layers_or_split_into_input_and_output_projections():
    """Per layer: attention (q, k, v, o) and MLP; split (the export's groups): q, k, v (one input) | o, and gate, up |
    down; the embedding table a group of its own either way."""
    from savpack.export.quantize import EMBEDDING_GROUP, matmul_groups

    model = onnx.load(str(GOLDEN / "bundle" / "graph.onnx"), load_external_data=False)
    whole = int8_variants.layer_groups(int8_variants.weight_matmuls(model))
    assert {group: len(names) for group, names in whole.items()} == \
        {"layer0.attention": 4, "layer0.mlp": 3, "layer1.attention": 4, "layer1.mlp": 3, "layer2.attention": 3}
    split = matmul_groups(model)
    assert [len(names) for names in split.values()] == [3, 1, 2, 1, 3, 1, 2, 1, 3, 0] and list(split)[-1] == EMBEDDING_GROUP
    assert [name.split("/")[-2] for name in split["/heads/decoder/mlp/gate_proj_1/MatMul"]] == ["gate_proj_1", "up_proj_1"]
    assert sorted(name for names in split.values() for name in names) == sorted(name for names in whole.values() for name in names)


def test_the_dynamic_simulation_quantizes_the_named_matmuls_and_the_table_with_one_scale(tmp_path):
    """simulate_dynamic (the tool's scans' rewrite): DynamicQuantizeLinear + MatMulInteger for exactly the named
    MatMuls, the embedding table int8 with one scale; judged on the golden items, nothing int8 disturbs nothing and
    any int8 disturbs."""
    import shutil

    from savpack.export.quantize import ShotJudge

    model = onnx.load(str(GOLDEN / "bundle" / "graph.onnx"), load_external_data=False)
    every = [name for name, _, _ in int8_variants.weight_matmuls(model)]
    names = [name for name, layer, _ in int8_variants.weight_matmuls(model) if layer == 0]
    int8_variants.simulate_dynamic(model, GOLDEN / "bundle", set(names), embedding=True)
    operators = collections.Counter(node.op_type for node in model.graph.node)
    assert operators["DynamicQuantizeLinear"] == operators["MatMulInteger"] == len(names) == 7
    from onnx import numpy_helper

    original = onnx.load(str(GOLDEN / "bundle" / "graph.onnx"), load_external_data=False)
    table = numpy_helper.to_array(next(tensor for tensor in original.graph.initializer
                                       if tensor.name == int8_variants.embedding_gather(original).input[0]),
                                  str(GOLDEN / "bundle"))
    found = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer if tensor.name.startswith("scan.table")}
    scale = found["scan.table_scale"]
    assert scale.shape == () and any(node.op_type == "DequantizeLinear" for node in model.graph.node)
    assert np.abs(found["scan.table"] * scale - table).max() <= scale / 2 * (1 + 1e-5)  # one step for the whole table

    source = tmp_path / "bundle"
    shutil.copytree(GOLDEN / "bundle", source)
    items = [json.loads(line)["text"] for line in (GOLDEN / "items.jsonl").read_text().splitlines()]
    judge = ShotJudge(source, {"words": items}, lambda graph, chosen, embedding: int8_variants.simulate_dynamic(
        graph, source, set(chosen), embedding), threads=1)
    assert judge.judge([], False)["words"]["head_disturbance"] == 0.0
    assert all(judge.judge(chosen, embedding)["words"]["head_disturbance"] > 0
               for chosen, embedding in ((names[:1], False), ([], True), (every, True)))


def test_the_tools_judge_remembers_judgements_by_group_and_reuses_an_earlier_runs():
    """Budgets share one scan: a judgement asked again (in any MatMul order) is not recomputed; --reuse-scan's
    record seeds a new judge, which then judges nothing it was given."""
    asked = []

    class Counting:
        def judge(self, names, embedding):
            asked.append((tuple(names), embedding))
            return {"pack": {"agreement": 1.0, "disturbance": float(len(names))}}

    groups = {"a": ["a1", "a2"], "b": ["b1"], int8_variants.EMBEDDING_GROUP: []}
    judge = int8_variants.RememberingJudge(Counting(), groups)
    first = judge.judge(["a1", "a2", "b1"], True)
    assert judge.judge(["b1", "a2", "a1"], True) == first and judge.judge(["b1"], False)["pack"]["disturbance"] == 1.0
    assert len(asked) == 2
    again = int8_variants.RememberingJudge(Counting(), groups, json.loads(json.dumps(judge.record())))
    assert again.judge(["a2", "b1", "a1"], True) == first and len(asked) == 2


@pytest.mark.parametrize("variant, operator, count", [("mixed-b02", "MatMulInteger", 4), ("mixed-b02-per-token", "MatMulInteger", 4)])
def test_a_mixed_variant_quantizes_only_the_chosen_matmuls(variant, operator, count, tmp_path):
    matmuls = int8_variants.weight_matmuls(onnx.load(str(GOLDEN / "bundle" / "graph.onnx"), load_external_data=False))
    chosen = [name for name, layer, attention in matmuls if layer == 0 and attention]
    int8_variants.quantize_variant(GOLDEN / "bundle", tmp_path / variant, variant, to_quantize=chosen)
    operators = _operators(tmp_path / variant)
    rotations = operators.get("QuantizeLinear", 0) if variant.endswith("per-token") else 0  # a rotation per input
    assert operators[operator] == count and operators["MatMul"] == 7 + len(matmuls) - count + rotations
    items = [json.loads(line)["text"] for line in (GOLDEN / "items.jsonl").read_text().splitlines()]
    reference = Classifier.load(GOLDEN / "bundle", threads=1)
    classifier = Classifier.load(tmp_path / variant, threads=1)
    expected, found = reference.head_vectors(items), classifier.head_vectors(items)
    assert np.abs(found - expected).max() < 0.05 * np.abs(expected).max()
