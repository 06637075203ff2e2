"""examples/node: the Node.js client (onnxruntime-node + the tokenizers package) gives savpack-run's records.

Needs Node.js and `npm ci` in examples/node (CI's .ci/run does both and sets SAVPACK_REQUIRE_NODE=1, which turns a
missing Node or missing packages into a failure instead of a skip).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from savpack_runtime import Classifier
from savpack_runtime.result import records_agree

import golden

pytestmark = pytest.mark.slow  # each test spawns Node.js

EXAMPLE = golden.ROOT / "examples" / "node"
# Every text graph kind and preprocessing the client handles: left padding with a chat template (qwen2, Gemma 3),
# positions counted from the mask (GPT-2), an encoder read at [CLS] with right padding and segment ids (BERT).
CASES = ("qwen2", "gemma3_text", "gpt2", "bert")
EXTRA_TEXTS = ["émojis 🙂 and accents: café, naïve", "two\nlines\tand tabs", "{text} braces {", "a " * 60 + "long one",
               "   spaced   out   ", "UPPER case Mixed", "the red sun is here"]


def _node() -> str:
    node = shutil.which("node")
    ready = node is not None and (EXAMPLE / "node_modules" / "onnxruntime-node").is_dir() and (EXAMPLE / "node_modules" / "tokenizers").is_dir()
    if not ready:
        if os.environ.get("SAVPACK_REQUIRE_NODE"):
            pytest.fail("SAVPACK_REQUIRE_NODE is set but node or examples/node/node_modules is missing (run npm ci there)")
        pytest.skip("Node.js or examples/node's packages are not installed (cd examples/node && npm ci)")
    return node


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_node(), str(EXAMPLE / "classify.js"), *map(str, args)], capture_output=True, text=True, timeout=120)


def _write_items(tmp_path, case: str):
    texts = [item["text"] for item in golden.items(case)] + EXTRA_TEXTS
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts), encoding="utf-8")
    return texts, data


def _node_and_python_records(bundle, texts: list[str], data) -> tuple[list[dict], list[dict]]:
    """classify.js's records of the items in `data` (batches of 3), and the Python runtime's for the same texts."""
    done = _run(bundle, data, "--batch-size", "3")
    assert done.returncode == 0, done.stderr
    results = Classifier.load(bundle, threads=1, batch_size=3).classify_batch(texts)
    return ([json.loads(line) for line in done.stdout.splitlines()],
            [{"source": f"{data}:{line}", **result.to_dict()} for line, result in enumerate(results, start=1)])


@pytest.mark.parametrize("case", CASES)
def test_node_records_equal_the_python_runtimes(case, tmp_path):
    """Labels, votes, shares, probabilities (1e-5), calibrated and abstained: savpack-run's records, item for item."""
    found, expected = _node_and_python_records(golden.bundle_dir(case), *_write_items(tmp_path, case))
    assert records_agree(found, expected)  # probabilities within 1e-5: each client rounds the graph's float32
    assert len({record["label"] for record in found}) > 1  # the comparison sees more than one class
    assert len({json.dumps(record["probabilities"]) for record in found}) > 2  # and probabilities that differ


def test_node_abstains_where_the_python_runtime_does(tmp_path):
    """--abstain-below: the label withheld on the items whose top probability is below the threshold (a probe pack)."""
    texts, data = _write_items(tmp_path, "gpt2")
    classifier = Classifier.load(golden.bundle_dir("gpt2"), threads=1, batch_size=3)
    threshold = float(np.median([max(result.probabilities.values()) for result in classifier.classify_batch(texts)]))
    results = classifier.classify_batch(texts, abstain_below=threshold)
    expected = [{"source": f"{data}:{line}", **result.to_dict()} for line, result in enumerate(results, start=1)]
    assert 0 < sum(record["abstained"] for record in expected) < len(expected)
    done = _run(golden.bundle_dir("gpt2"), data, "--batch-size", "3", "--abstain-below", repr(threshold))
    assert done.returncode == 0, done.stderr
    assert records_agree([json.loads(line) for line in done.stdout.splitlines()], expected)
    wrong = _run(golden.bundle_dir("gpt2"), data, "--abstain-below", "1.5")
    assert wrong.returncode == 1 and "--abstain-below needs a probability from 0 to 1" in wrong.stderr


def test_node_refuses_what_it_cannot_classify(tmp_path):
    data = tmp_path / "items.jsonl"
    data.write_text(json.dumps({"text": "a"}) + "\n")
    images = _run(golden.bundle_dir("qwen2_vl"), data)
    assert images.returncode == 1 and "graph kind \"qwen2_vl\"" in images.stderr and "Error:" not in images.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{not json\n')
    broken = _run(golden.bundle_dir("qwen2"), bad)
    assert broken.returncode == 1 and "bad.jsonl:2: not valid JSON" in broken.stderr
    bad.write_text('{"text": ""}\n')
    assert "bad.jsonl:1: has neither text nor images" in _run(golden.bundle_dir("qwen2"), bad).stderr
    bundle = tmp_path / "bundle"
    shutil.copytree(golden.bundle_dir("qwen2"), bundle)
    (bundle / "tokenizer.json").write_text((bundle / "tokenizer.json").read_text().replace('"a"', '"b"', 1))
    altered = _run(bundle, data)
    assert altered.returncode == 1 and "tokenizer.json does not match its sha256" in altered.stderr
    # A bundle exported before the probabilities moved into the graph: the Python runtime computes them, Node cannot.
    older = tmp_path / "older"
    shutil.copytree(golden.bundle_dir("qwen2"), older)
    info = json.loads((older / "bundle.json").read_text())
    for entry in info["packs"]:
        del entry["outputs"]["probabilities"], entry["calibrated"]
    (older / "bundle.json").write_text(json.dumps(info))
    refused = _run(older, data)
    assert refused.returncode == 1 and "has no probabilities in the graph" in refused.stderr and "export it again" in refused.stderr


def test_node_reads_an_int8_bundle_as_the_python_runtime_does(tmp_path):
    """An int8 bundle (integer products, rotated rows: standard operators) gives the same records in Node."""
    quantize = pytest.importorskip("savpack.export.quantize")  # the builder's int8 rewrite, if installed
    bundle = tmp_path / "bundle"
    shutil.copytree(golden.bundle_dir("qwen2"), bundle)
    quantize.quantize_graph(bundle / "graph.onnx", tmp_path / "int8.onnx", per_channel=True)
    quantize.install_graph(tmp_path / "int8.onnx", bundle)
    found, expected = _node_and_python_records(bundle, *_write_items(tmp_path, "qwen2"))
    assert json.loads((bundle / "bundle.json").read_text())["graph"]["weights"] == "int8"
    assert records_agree(found, expected) and len({record["label"] for record in found}) > 1
