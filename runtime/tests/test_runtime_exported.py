"""The runtime against the golden bundles in exported/: head vectors and labels equal the builder's, without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from savpack_runtime import Classifier, graph_inputs
from savpack_runtime.bundle import Bundle
from savpack_runtime.session import GraphSession
from savpack_runtime.scoring import pack_decision
from savpack_runtime.vote import cosine_to_centroids

import golden

CASES = golden.CASES
# Probabilities: the graph's (float32) against numpy's (float64) on the same cosines.
PROBABILITY_TOLERANCE = 1e-6
# The runtime's against the builder's (from PyTorch's head vectors), or between batchings (padding moves the graph's
# float rounding): head vectors agree to ~1e-7, cosines to ~1e-8, and a pack fitted to temperature 0.001 (these
# random-weight fixtures reach the grid's end) multiplies that by 1000 in its logits: ~2e-6 measured.
OTHER_VECTORS_TOLERANCE = 1e-5


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch", ["all", "first"])
def test_graph_matches_builder_head_vectors_and_labels(case, batch):
    bundle = Bundle.load(golden.bundle_dir(case), check_weights=True)
    session = GraphSession(bundle.graph_path, "cpu", threads=1)
    recorded = golden.recorded_batches(case)
    rows = recorded["order"] if batch == "all" else np.array([0])
    outputs = session.run_all(graph_inputs.plan(bundle.graph["kind"], bundle.graph["plan"], recorded[batch]))
    vectors = outputs[graph_inputs.OUTPUT_NAME]
    expected = golden.expected_vectors(case)[rows]
    assert vectors.shape == expected.shape
    assert golden.within_tolerance(vectors, expected)
    for entry in bundle.packs:
        # numpy alone (savpack_runtime.vote and .scoring) on the graph's head vectors: the builder's labels.
        reference = pack_decision(entry.pack, vectors[:, entry.positions])
        labels = [entry.pack.labels[i] for i in reference.predictions]
        assert labels == [golden.expected(case)["packs"][entry.name]["labels"][i] for i in rows]
        # The scores inside the graph are numpy's on the graph's own head vectors: the cosines (1e-6), then the vote,
        # label and probabilities from those cosines. (From numpy's own cosines, which differ by float32 rounding, the
        # probabilities of a pack fitted to temperature 0.001 would move by ~1e-5: 1e-7 / temperature.)
        cosines = outputs[entry.outputs["cosines"]]
        assert np.abs(cosines - cosine_to_centroids(vectors[:, entry.positions], entry.pack.centroids)).max() <= 1e-6
        scored = pack_decision(entry.pack, vectors[:, entry.positions], similarities=cosines)
        assert np.array_equal(outputs[entry.outputs["votes"]], scored.votes.votes)
        assert np.array_equal(outputs[entry.outputs["prediction"]], scored.predictions)
        assert np.array_equal(scored.predictions, reference.predictions)
        assert np.abs(outputs[entry.outputs["probabilities"]] - scored.probabilities).max() <= PROBABILITY_TOLERANCE
        assert scored.calibrated == (entry.pack.scoring_model is not None)


def test_golden_batches_mix_lengths_and_image_sizes():
    """The "all" batch really is mixed: padding in it, and (for image cases) images of several sizes."""
    for case in CASES:
        batch = golden.recorded_batches(case)["all"]
        assert len(set(batch["attention_mask"].sum(axis=1).tolist())) > 1
    assert len({tuple(row) for row in golden.recorded_batches("qwen2_vl")["all"]["image_grid_thw"].tolist()}) > 2
    assert len({tuple(row) for row in golden.recorded_batches("llava_onevision")["all"]["image_sizes"].tolist()}) > 2



@pytest.mark.parametrize("case", CASES)
def test_classifier_matches_builder(case):
    """Preprocessing, planning, graph and every pack's vote: the builder's labels, votes and head vectors."""
    classifier = Classifier.load(golden.bundle_dir(case), threads=1)
    assert classifier.providers == ["CPUExecutionProvider"]
    items = golden.items(case)
    results = classifier.classify_batch(items)
    expected = golden.expected(case)["packs"]
    assert list(results[0].by_pack) == list(expected)
    for name, pack_expected in expected.items():
        assert [result.by_pack[name].label for result in results] == pack_expected["labels"]
        for result, record in zip(results, pack_expected["records"]):
            assert result.by_pack[name].votes == record["votes"]
            assert result.by_pack[name].shares == pytest.approx(record["shares"], abs=1e-6)
            # The builder's probabilities (its records round to 7 decimals): the same scoring model on PyTorch's head
            # vectors, which the graph's equal within the export tolerance.
            assert result.by_pack[name].probabilities == pytest.approx(record["probabilities"], abs=OTHER_VECTORS_TOLERANCE)
            assert result.by_pack[name].calibrated == record["calibrated"]
    assert [result.label for result in results] == next(iter(expected.values()))["labels"]
    assert golden.within_tolerance(classifier.head_vectors(items),
                                   golden.expected_vectors(case))
    # batch 1, and batches of 2 (the mixed batch split differently) give the same answers
    _assert_same_results([classifier.classify(**items[0])], results[:1])
    _assert_same_results(classifier.classify_batch(items, batch_size=2), results)


def _assert_same_results(found: list, expected: list) -> None:
    """Equal records, probabilities within OTHER_VECTORS_TOLERANCE."""
    def approx(record: dict) -> dict:
        record = dict(record, probabilities=pytest.approx(record["probabilities"], abs=OTHER_VECTORS_TOLERANCE))
        if "packs" in record:
            record["packs"] = {name: approx(inner) for name, inner in record["packs"].items()}
        return record

    assert [result.to_dict() for result in found] == [approx(result.to_dict()) for result in expected]


_FRESH_INTERPRETER = """
import json, sys
import golden
from savpack_runtime import Classifier
labels = {}
for case in golden.CASES:
    classifier = Classifier.load(golden.bundle_dir(case), threads=1)
    labels[case] = [result.label for result in classifier.classify_batch(golden.items(case))]
banned = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "transformers", "onnx", "onnxscript"))
print(json.dumps({"banned": banned, "labels": labels, "onnxruntime": "onnxruntime" in sys.modules}))
"""


@pytest.mark.slow
def test_runtime_never_imports_torch_transformers_or_onnx():
    """A fresh interpreter loads every golden bundle and classifies; torch, transformers and onnx stay unimported."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # where `golden` lives
    done = subprocess.run([sys.executable, "-c", _FRESH_INTERPRETER], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["banned"] == []
    assert report["onnxruntime"]  # the check is meaningful: the graph did run in this interpreter
    for case in CASES:
        first_pack = next(iter(golden.expected(case)["packs"].values()))
        assert report["labels"][case] == first_pack["labels"]
