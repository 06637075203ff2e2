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
from savpack_runtime.result import AGREEMENT_TOLERANCE, records_agree
from savpack_runtime.session import GraphSession
from savpack_runtime.scoring import pack_decision
from savpack_runtime.vote import cosine_to_centroids

import golden

CASES = golden.CASES
# In-graph probabilities (float32) against numpy's (float64) on the graph's own cosines.
SCORE_TOLERANCE = 1e-6


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
        assert np.abs(outputs[entry.outputs["probabilities"]] - scored.probabilities).max() <= SCORE_TOLERANCE
        assert scored.calibrated == (entry.pack.scoring_model is not None)


def test_golden_batches_mix_lengths_and_image_sizes():
    """The "all" batch really is mixed: padding in it, and (for image cases) images of several sizes."""
    for case in CASES:
        batch = golden.recorded_batches(case)["all"]
        assert len(set(batch["attention_mask"].sum(axis=1).tolist())) > 1
    assert len({tuple(row) for row in golden.recorded_batches("qwen2_vl")["all"]["image_grid_thw"].tolist()}) > 2
    assert len({tuple(row) for row in golden.recorded_batches("llava_onevision")["all"]["image_sizes"].tolist()}) > 2


# Through the graph: its head vectors equal the hooks' to ~1e-7, which a fitted temperature of ~0.01 can carry to a few
# 1e-6 in the probabilities; the same vectors give the builder's probabilities to 1e-6 (the test below).
PROBABILITY_TOLERANCE = AGREEMENT_TOLERANCE


@pytest.mark.parametrize("case", CASES)
def test_runtime_decision_on_the_builders_vectors_is_the_builders(case):
    """The runtime's probabilities equal the builder's (1e-6) given the same head vectors: the hooks' vectors recorded
    with the golden bundle through savpack_runtime.scoring, against the builder's records."""
    from savpack_runtime.result import results_from_decisions
    from savpack_runtime.scoring import pack_decision

    bundle, vectors = Bundle.load(golden.bundle_dir(case)), golden.expected_vectors(case)
    for entry in bundle.packs:
        decision = pack_decision(entry.pack, vectors[:, entry.positions])
        records = golden.expected(case)["packs"][entry.name]["records"]
        for result, record in zip(results_from_decisions({entry.name: (entry.pack.labels, decision)}), records):
            assert result.label == record["label"] and result.votes == record["votes"]
            assert result.probabilities == pytest.approx(record["probabilities"], abs=1e-6)


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
            assert result.by_pack[name].probabilities == pytest.approx(record["probabilities"], abs=PROBABILITY_TOLERANCE)
            assert result.by_pack[name].calibrated == record["calibrated"]
    assert [result.label for result in results] == next(iter(expected.values()))["labels"]
    assert golden.within_tolerance(classifier.head_vectors(items),
                                   golden.expected_vectors(case))
    # batch 1, and batches of 2 (the mixed batch split differently) give the same answers
    assert records_agree(classifier.classify(**items[0]), results[0])
    assert records_agree(classifier.classify_batch(items, batch_size=2), results)


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
