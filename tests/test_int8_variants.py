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


@pytest.mark.parametrize("variant, operator, count", [("per-token", "MatMulInteger", 17), ("per-token-smooth", "MatMulInteger", 17),
                                                      ("nbits8-b32", "MatMulNBits", 17), ("static-minmax", "QuantizeLinear", 17),
                                                      ("static-percentile", "QuantizeLinear", 17)])
def test_the_measured_alternatives_quantize_every_weight_matrix_and_classify(variant, operator, count, tmp_path):
    """The variants measured against the default: each weight MatMul replaced (the scores never), labels kept on the
    golden items, head vectors near float32's. per-token: one activation quantization per distinct input (q, k, v
    share theirs)."""
    items = [json.loads(line)["text"] for line in (GOLDEN / "items.jsonl").read_text().splitlines()]
    int8_variants.quantize_variant(GOLDEN / "bundle", tmp_path / variant, variant, items)
    operators = _operators(tmp_path / variant)
    # Left as MatMul: attention's two per layer and the scores' (QDQ keeps the weight MatMuls, fed by DequantizeLinear).
    assert operators[operator] >= count and operators["MatMul"] == (24 if variant.startswith("static") else 7)
    if variant.startswith("per-token"):
        assert operators["QuantizeLinear"] == 9 and operators["DequantizeLinear"] == 0
    with int8_variants.contrib_operators(variant.startswith("nbits")):
        classifier = Classifier.load(tmp_path / variant, threads=1)
    reference = Classifier.load(GOLDEN / "bundle", threads=1)
    expected, found = reference.head_vectors(items), classifier.head_vectors(items)
    assert np.abs(found - expected).max() < 0.05 * np.abs(expected).max()
    assert np.mean([a.label == b.label for a, b in zip(classifier.classify_batch(items), reference.classify_batch(items))]) >= 0.6


def test_mixed_groups_split_each_layer_into_input_and_output_projections():
    """Per layer: attention (q, k, v, o) and MLP; split: q, k, v (one input) | o, and gate, up | down."""
    model = onnx.load(str(GOLDEN / "bundle" / "graph.onnx"), load_external_data=False)
    matmuls = int8_variants.weight_matmuls(model)
    whole = int8_variants.matmul_groups(matmuls)
    assert {group: len(names) for group, names in whole.items()} == \
        {"layer0.attention": 4, "layer0.mlp": 3, "layer1.attention": 4, "layer1.mlp": 3, "layer2.attention": 3}
    split = int8_variants.matmul_groups(matmuls, {node.name: node.input[0] for node in model.graph.node if node.input})
    assert {group: len(names) for group, names in split.items()} == \
        {"layer0.attention.in": 3, "layer0.attention.out": 1, "layer0.mlp.in": 2, "layer0.mlp.out": 1,
         "layer1.attention.in": 3, "layer1.attention.out": 1, "layer1.mlp.in": 2, "layer1.mlp.out": 1,
         "layer2.attention.in": 3}
    assert [name.split("/")[-2] for name in split["layer1.mlp.in"] + split["layer1.mlp.out"]] == \
        ["gate_proj_1", "up_proj_1", "down_proj_1"]


def test_the_shot_judge_measures_the_simulated_int8_graph_against_float32(tmp_path):
    """Nothing quantized: every label kept, no disturbance; the weight MatMuls, or the embedding table, quantized:
    some disturbance; the bundle's folder left as it was."""
    import shutil

    source = tmp_path / "bundle"
    shutil.copytree(GOLDEN / "bundle", source)  # the judge writes its scan graph beside the weights
    items = [json.loads(line)["text"] for line in (GOLDEN / "items.jsonl").read_text().splitlines()]
    judge = int8_variants.ShotJudge(source, {"words": items}, threads=1)
    assert judge.judge(set(), embedding=False) == {"words": {"agreement": 1.0, "disturbance": 0.0}}
    names = {name for name, _, _ in int8_variants.weight_matmuls(onnx.load(str(source / "graph.onnx"), load_external_data=False))}
    assert judge.judge(names, embedding=False)["words"]["disturbance"] > 0
    assert judge.judge(set(), embedding=True)["words"]["disturbance"] > 0
    assert sorted(path.name for path in source.iterdir()) == sorted(path.name for path in (GOLDEN / "bundle").iterdir())


class _FakeJudge:
    """Each MatMul disturbs by its weight in `cost`; quantizing `breaks` changes a shot's label."""

    def __init__(self, cost: dict[str, float], breaks: str):
        self.cost, self.breaks = cost, breaks

    def judge(self, names, embedding):
        return {"pack": {"agreement": 0.9 if self.breaks in names else 1.0,
                         "disturbance": sum(self.cost[name] for name in names) + (0.5 if embedding else 0.0)}}


def test_the_mixed_choice_keeps_float_what_moves_the_shots_labels_and_what_exceeds_the_budget():
    groups = {"a": ["a1"], "b": ["b1"], "c": ["c1", "c2"], "d": ["d1"]}
    judge = _FakeJudge({"a1": 0.1, "b1": 0.2, "c1": 1.0, "c2": 1.0, "d1": 0.3}, breaks="b1")
    chosen = int8_variants.choose_groups(judge, groups, {"labels": None, "half": 0.5}, lambda message: None)
    assert chosen["order"] == ["a", "b", "d", "embedding", "c"]  # least disturbing first; "b" alone keeps labels
    # b changes a label: every prefix holding it fails, so only "a" is quantized, whatever the budget
    assert chosen["quantized"] == {"labels": ["a"], "half": ["a"]}
    judge.breaks = "none"
    chosen = int8_variants.choose_groups(judge, groups, {"labels": None, "half": 0.5}, lambda message: None)
    # all-int8 disturbs 3.1: half of it (1.55) admits a, b, d and the embedding (1.1), not c (2.0 more)
    assert chosen["quantized"] == {"labels": ["a", "b", "d", "embedding", "c"], "half": ["a", "b", "d", "embedding"]}


@pytest.mark.parametrize("variant, operator, count", [("mixed-r50", "MatMulInteger", 4), ("mixed-r50-per-token", "MatMulInteger", 4)])
def test_a_mixed_variant_quantizes_only_the_chosen_matmuls(variant, operator, count, tmp_path):
    matmuls = int8_variants.weight_matmuls(onnx.load(str(GOLDEN / "bundle" / "graph.onnx"), load_external_data=False))
    chosen = [name for name, layer, attention in matmuls if layer == 0 and attention]
    int8_variants.quantize_variant(GOLDEN / "bundle", tmp_path / variant, variant, to_quantize=chosen)
    operators = _operators(tmp_path / variant)
    assert operators[operator] == count and operators["MatMul"] == 7 + len(matmuls) - count
    items = [json.loads(line)["text"] for line in (GOLDEN / "items.jsonl").read_text().splitlines()]
    reference = Classifier.load(GOLDEN / "bundle", threads=1)
    classifier = Classifier.load(tmp_path / variant, threads=1)
    expected, found = reference.head_vectors(items), classifier.head_vectors(items)
    assert np.abs(found - expected).max() < 0.05 * np.abs(expected).max()
