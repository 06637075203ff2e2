"""Bundle reading and the model checks: a damaged bundle or a pack for another model is refused with a named error."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from savpack_runtime import Classifier, Pack
from savpack_runtime import bundle as fmt
from savpack_runtime.cli import main as cli_main
from savpack_runtime.errors import BundleError, BundleVersionError, GraphError, ModelMismatchError, SavpackWarning
from savpack_runtime.result import records_agree
from savpack_runtime.session import GraphSession, check_operator_domains, resolve_providers

import golden


@pytest.fixture
def bundle_copy(tmp_path):
    """A writable copy of the two-pack Qwen2-VL golden bundle."""
    target = tmp_path / "bundle"
    shutil.copytree(golden.bundle_dir("qwen2_vl"), target)
    return target


def _edit_info(folder, change):
    path = folder / fmt.BUNDLE_FILE
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info))


def _rewrite_pack(folder, index, **changes):
    """Replace pack `index` with an edited copy, keeping bundle.json's digest of it consistent."""
    info = json.loads((folder / fmt.BUNDLE_FILE).read_text())
    entry = info["packs"][index]
    pack = Pack.load(folder / entry["file"]).replace(**changes)
    pack.save(folder / entry["file"], force=True)
    _edit_info(folder, lambda data: data["packs"][index].update(sha256=fmt.file_sha256(folder / entry["file"])))
    return pack


def test_golden_bundle_loads_with_two_packs_and_their_positions():
    bundle = fmt.Bundle.load(golden.bundle_dir("qwen2_vl"), check_weights=True)
    assert [entry.name for entry in bundle.packs] == ["colour", "colour-loo"]
    for entry in bundle.packs:
        assert np.array_equal(bundle.heads[entry.positions], entry.pack.heads)
    assert len(bundle.heads) == len({tuple(h) for entry in bundle.packs for h in entry.pack.heads.tolist()})


@pytest.mark.parametrize("damage, error, words", [
    (lambda f: (f / "bundle.json").unlink(), BundleError, "bundle.json is missing"),
    (lambda f: (f / "bundle.json").write_text("{not json"), BundleError, "not valid JSON"),
    (lambda f: _edit_info(f, lambda i: i.update(format_version=99)), BundleVersionError, "newer"),
    (lambda f: _edit_info(f, lambda i: i.update(format="other")), BundleError, "'format'"),
    (lambda f: _edit_info(f, lambda i: i.pop("graph")), BundleError, "lacks ['graph']"),
    (lambda f: _edit_info(f, lambda i: i["graph"].update(kind="audio")), BundleError, "graph.kind"),
    (lambda f: _edit_info(f, lambda i: i["graph"].update(inputs=["input_ids"])), BundleError, "graph.inputs"),
    (lambda f: _edit_info(f, lambda i: i["graph"].update(file="../graph.onnx")), BundleError, "relative path inside"),
    (lambda f: (f / "graph.onnx").write_bytes((f / "graph.onnx").read_bytes() + b"x"), BundleError, "does not match its sha256"),
    (lambda f: (f / "graph.onnx.data").write_bytes(b"\0" * 10), BundleError, "truncated or replaced"),
    (lambda f: (f / "packs" / "colour.safetensors").unlink(), BundleError, "is missing"),
    (lambda f: _edit_info(f, lambda i: i["packs"][0].update(positions=[0])), BundleError, "positions"),
    (lambda f: _edit_info(f, lambda i: i["packs"][1].update(name="colour")), BundleError, "names repeat"),
    (lambda f: _edit_info(f, lambda i: i["packs"][0].update(labels=["red", "green", "blue"])), BundleError, "packs[0].labels"),
    (lambda f: _edit_info(f, lambda i: i["packs"][0]["outputs"].pop("votes")), BundleError, "packs[0].outputs"),
    (lambda f: _edit_info(f, lambda i: i["packs"][0]["outputs"].update(probabilities=3)), BundleError, "packs[0].outputs"),
    (lambda f: _edit_info(f, lambda i: i["packs"][1].update(calibrated=False)), BundleError,
     "packs[1].calibrated is False, but pack 'colour-loo' carries scoring model"),
    (lambda f: _edit_info(f, lambda i: i["packs"][1].pop("outputs")), BundleError, "packs[1] must be an object"),
])
def test_damaged_bundle_is_refused_with_a_named_error(bundle_copy, damage, error, words):
    damage(bundle_copy)
    with pytest.raises(error) as caught:
        fmt.Bundle.load(bundle_copy)
    assert words in str(caught.value)


def test_weights_hash_is_checked_by_default(bundle_copy, tmp_path):
    data = bytearray((bundle_copy / "graph.onnx.data").read_bytes())
    data[100] ^= 0xFF  # same size: only the full hash notices
    (bundle_copy / "graph.onnx.data").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        fmt.Bundle.load(bundle_copy)
    with pytest.raises(BundleError, match="does not match its sha256"):
        Classifier.load(bundle_copy)
    fmt.Bundle.load(bundle_copy, check_weights=False)  # the opt-out skips only the weights' hash
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"text": "what colour?", "image": str(golden.case_dir("qwen2_vl") / "items" / "qwen2_vl-0-0.png")}) + "\n")
    assert cli_main(["classify", str(bundle_copy), "--data", str(items)]) == 1
    assert cli_main(["classify", str(bundle_copy), "--data", str(items), "--no-check-weights"]) == 0


def test_pack_for_another_model_is_refused(bundle_copy):
    pack = Pack.load(bundle_copy / "packs" / "colour-loo.safetensors")
    _rewrite_pack(bundle_copy, 1, model={**pack.model, "fingerprint": "0" * 64})
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        fmt.Bundle.load(bundle_copy)


def test_pack_with_other_heads_is_refused(bundle_copy):
    pack = Pack.load(bundle_copy / "packs" / "colour.safetensors")
    _rewrite_pack(bundle_copy, 0, heads=np.roll(pack.heads, 1, axis=0))
    with pytest.raises(ModelMismatchError, match="positions pick heads"):
        fmt.Bundle.load(bundle_copy)


def test_pack_reading_another_token_is_refused(bundle_copy):
    pack = Pack.load(bundle_copy / "packs" / "colour.safetensors")
    _rewrite_pack(bundle_copy, 0, prompt={**pack.prompt, "token_position": "first"})
    with pytest.raises(BundleError, match="'first' token"):
        fmt.Bundle.load(bundle_copy)


def test_graph_for_another_model_is_refused(bundle_copy):
    """bundle.json and every pack say model X, the graph's own metadata says another: refused at load."""
    for index, name in enumerate(["colour", "colour-loo"]):
        pack = Pack.load(bundle_copy / "packs" / f"{name}.safetensors")
        _rewrite_pack(bundle_copy, index, model={**pack.model, "revision": "other"})
    _edit_info(bundle_copy, lambda info: info["model"].update(revision="other"))
    with pytest.raises(ModelMismatchError, match="revision"):
        Classifier.load(bundle_copy)


def test_graph_for_other_heads_is_refused(bundle_copy):
    heads = fmt.Bundle.load(bundle_copy).heads.tolist()
    swapped = [heads[1], heads[0]] + heads[2:]
    order = {tuple(head): position for position, head in enumerate(swapped)}

    def swap(info):
        info["graph"]["heads"] = swapped
        for entry in info["packs"]:
            entry["positions"] = [order[tuple(heads[p])] for p in entry["positions"]]

    _edit_info(bundle_copy, swap)
    fmt.Bundle.load(bundle_copy)  # consistent on its own...
    with pytest.raises(ModelMismatchError, match="the graph returns heads"):
        Classifier.load(bundle_copy)  # ...but not with what the graph computes


def test_graph_exported_for_other_packs_is_refused(bundle_copy):
    _rewrite_pack(bundle_copy, 0, version="9.9.9")  # same model and heads, another pack
    with pytest.raises(ModelMismatchError, match="not one the graph was exported for"):
        Classifier.load(bundle_copy)


def _with_opset_import(graph: bytes, domain: str) -> bytes:
    """Append an OperatorSetIdProto (field 8) to a ModelProto: protobuf merges repeated fields."""
    entry = bytes([0x0A, len(domain)]) + domain.encode() + bytes([0x10, 0x01])
    return graph + bytes([0x42, len(entry)]) + entry


def test_graph_with_nonstandard_operator_domain_is_refused(tmp_path):
    graph = (golden.bundle_dir("qwen2") / "graph.onnx").read_bytes()
    assert check_operator_domains(golden.bundle_dir("qwen2") / "graph.onnx") == [("", 18)]
    path = tmp_path / "graph.onnx"
    path.write_bytes(_with_opset_import(graph, "com.microsoft"))
    with pytest.raises(GraphError, match=r"operator domains \['com.microsoft'\]"):
        GraphSession(path)
    path.write_bytes(b"\xff" * 100)
    with pytest.raises(GraphError, match="not an ONNX model file"):
        check_operator_domains(path)


def test_cuda_request_falls_back_to_cpu_with_a_warning():
    """On a machine without a usable CUDA, asking for it runs on the CPU and says so."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = GraphSession(golden.bundle_dir("qwen2") / "graph.onnx", providers="cuda", threads=1)
    if "CUDAExecutionProvider" in session.providers:
        pytest.skip("CUDA runs here")
    assert session.providers == ["CPUExecutionProvider"]
    assert any(issubclass(w.category, SavpackWarning) and "CUDAExecutionProvider" in str(w.message) for w in caught)


def test_provider_names():
    assert resolve_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(GraphError, match="provider 'tpu'"):
        resolve_providers("tpu")


def _classified(folder) -> list[dict]:
    """The golden qwen2_vl items' records (both packs) with the bundle in `folder`."""
    return [result.to_dict() for result in Classifier.load(folder).classify_batch(golden.items("qwen2_vl"))]


def _numpy_must_not(monkeypatch, *names: str) -> None:
    from savpack_runtime import scoring

    for name in names:
        monkeypatch.setattr(scoring, name, lambda *args, _name=name, **kwargs: pytest.fail(f"numpy's {_name} ran"))


def test_the_classifier_uses_the_scores_of_the_graph(bundle_copy, monkeypatch):
    """A format-2 bundle is classified from the graph's own outputs (a vote pack and a probe pack): numpy's cosines,
    vote and probabilities are not called; a pack whose outputs name what the graph lacks is refused at load."""
    expected = _classified(bundle_copy)
    assert {record["packs"]["colour-loo"]["calibrated"] for record in expected} == {True}
    _numpy_must_not(monkeypatch, "cosine_to_centroids", "vote", "probabilities")
    assert _classified(bundle_copy) == expected
    _edit_info(bundle_copy, lambda info: info["packs"][1]["outputs"].update(votes="pack7.votes"))
    with pytest.raises(GraphError, match=r"reads graph outputs \['pack7.votes'\]"):
        Classifier.load(bundle_copy)


def test_a_bundle_without_probabilities_in_the_graph_scores_them_in_numpy(bundle_copy, monkeypatch):
    """Format-2 bundles written before the probabilities moved into the graph still load; the runtime takes the
    graph's vote and computes the probabilities in numpy, to the graph's within 1e-6."""
    from savpack_runtime import scoring

    expected = _classified(bundle_copy)

    def without_probabilities(info):
        for entry in info["packs"]:
            del entry["outputs"]["probabilities"], entry["calibrated"]

    _edit_info(bundle_copy, without_probabilities)
    assert all("probabilities" not in entry.outputs for entry in fmt.Bundle.load(bundle_copy).packs)
    computed = []
    monkeypatch.setattr(scoring, "probabilities", lambda *args, _real=scoring.probabilities: computed.append(1) or _real(*args))
    _numpy_must_not(monkeypatch, "vote")
    assert records_agree(_classified(bundle_copy), expected, tolerance=1e-6)  # the graph's float32 against float64
    assert computed  # numpy computed them


def test_a_format_1_bundle_votes_in_numpy(bundle_copy, monkeypatch):
    """Bundles written before the vote moved into the graph keep working: the runtime votes on the head vectors."""
    expected = _classified(bundle_copy)

    def as_format_1(info):
        info["format_version"] = 1
        for entry in info["packs"]:
            del entry["labels"], entry["outputs"], entry["calibrated"]

    _edit_info(bundle_copy, as_format_1)
    assert all(entry.outputs is None for entry in fmt.Bundle.load(bundle_copy).packs)
    assert records_agree(_classified(bundle_copy), expected, tolerance=1e-6)  # the graph's float32 against float64
    _numpy_must_not(monkeypatch, "vote")
    with pytest.raises(pytest.fail.Exception, match="numpy's vote ran"):
        _classified(bundle_copy)
