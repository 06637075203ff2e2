"""exported/bundles/ is what tools/make_exported.py makes: regenerate into a temporary folder and compare.

Bytes are compared only where they cannot depend on third-party releases (the graph with the same torch, transformers
and onnx). Packs record the producing versions (created_by) and the model folder's revision, so they are compared by
what they hold: heads, labels, counts, prompt, model identity and numbers within tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers

import make_exported
from savpack_runtime import Pack

ROOT = Path(__file__).resolve().parent.parent
EXPORTED = ROOT / "exported" / "bundles"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("regenerated") / "bundles"
    return out, make_exported.make_all(out)


def test_regenerated_golden_files_agree(regenerated):
    out, manifest = regenerated
    committed = json.loads((EXPORTED / "manifest.json").read_text())
    assert sorted(manifest["cases"]) == sorted(committed["cases"])
    same_versions = {key: manifest["versions"][key] for key in ("torch", "transformers", "onnx")} == \
                    {key: committed["versions"][key] for key in ("torch", "transformers", "onnx")}
    for case, made in manifest["cases"].items():
        assert made["heads"] == committed["cases"][case]["heads"], case
        with np.load(out / case / "expected.npz") as new, np.load(EXPORTED / case / "expected.npz") as old:
            assert np.abs(new["head_vectors"] - old["head_vectors"]).max() <= 1e-4, case
        new_expected = json.loads((out / case / "expected.json").read_text())
        old_expected = json.loads((EXPORTED / case / "expected.json").read_text())
        assert new_expected["prompts"] == old_expected["prompts"], case
        for pack in old_expected["packs"]:
            assert new_expected["packs"][pack]["labels"] == old_expected["packs"][pack]["labels"], (case, pack)
        for pack_file in sorted((EXPORTED / case / "bundle" / "packs").iterdir()):
            assert_same_pack(Pack.load(out / case / "bundle" / "packs" / pack_file.name), Pack.load(pack_file))
        if same_versions:  # the graph bytes are reproducible with the same torch, transformers and onnx
            assert made["graph_sha256"] == committed["cases"][case]["graph_sha256"], case
            assert made["graph_data_sha256"] == committed["cases"][case]["graph_data_sha256"], case


def assert_same_pack(new: Pack, old: Pack) -> None:
    """Same classifier: what decides a label is equal (numbers to float32 round-off), whatever wrote the file."""
    assert new.labels == old.labels
    np.testing.assert_array_equal(new.heads, old.heads)
    np.testing.assert_array_equal(new.class_counts, old.class_counts)
    for name in ("centroids", "head_scores", "all_head_scores"):
        np.testing.assert_allclose(getattr(new, name), getattr(old, name), rtol=1e-5, atol=1e-6, err_msg=name)
    assert new.prompt == old.prompt
    assert new.selection == old.selection
    assert (new.scoring is None) == (old.scoring is None)
    if new.scoring is not None:  # the fitted scoring model: the same classifier, its numbers to round-off
        assert (new.scoring["classifier"], new.scoring["fitted_on"]) == (old.scoring["classifier"], old.scoring["fitted_on"])
        for name in ("temperature", "sharpness"):
            assert new.scoring[name] == pytest.approx(old.scoring[name], rel=1e-4), name
        for name in ("probe_weight", "probe_bias"):
            if getattr(old, name) is not None:
                np.testing.assert_allclose(getattr(new, name), getattr(old, name), rtol=1e-4, atol=1e-5, err_msg=name)
    assert {key: value for key, value in new.model.items() if key != "revision"} == \
           {key: value for key, value in old.model.items() if key != "revision"}
    assert (new.name, new.version, new.dataset) == (old.name, old.version, old.dataset)


def test_pack_comparison_sees_a_changed_centroid():
    pack = Pack.load(next((EXPORTED / "qwen2" / "bundle" / "packs").iterdir()))
    moved = pack.centroids.copy()
    moved[0, 0, 0] += 1e-3
    with pytest.raises(AssertionError):
        assert_same_pack(pack.replace(centroids=moved), pack)


def test_golden_files_record_their_versions():
    versions = json.loads((EXPORTED / "manifest.json").read_text())["versions"]
    assert set(versions) >= {"torch", "transformers", "onnx", "onnxruntime"}
    if versions["torch"] != torch.__version__ or versions["transformers"] != transformers.__version__ or versions["onnx"] != onnx.__version__:
        pytest.skip("exported/ was made with other versions: only numbers are compared, not graph bytes")
