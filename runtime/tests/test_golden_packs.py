"""The golden packs under exported/packs/ (docs/format.md): this reader loads, warns about or refuses each as
expected.json says, reproduces their bytes, and the tool that made them still makes the same bytes. No torch."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from savpack_runtime import Pack
from savpack_runtime import errors
from savpack_runtime import format as fmt
from savpack_runtime.errors import PackError, SavpackWarning
from savpack_runtime.scoring import pack_decision

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "exported" / "packs"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())["files"]


def by_outcome(outcome: str) -> list[str]:
    return sorted(name for name, facts in EXPECTED.items() if facts["outcome"] == outcome)


def test_every_supported_format_version_has_a_golden_pack():
    loadable = {facts["format_version"] for facts in EXPECTED.values() if facts["outcome"] in ("load", "warn")}
    assert loadable == set(fmt.SUPPORTED_VERSIONS)
    assert all((GOLDEN / name).stat().st_size < 16_384 for name in EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_file_bytes_are_the_recorded_ones(name):
    data = (GOLDEN / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == EXPECTED[name]["sha256"]


@pytest.mark.parametrize("name", by_outcome("load"))
def test_loads_with_the_recorded_content_and_no_warning(name):
    facts = EXPECTED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pack = Pack.load(GOLDEN / name)
    assert pack.format_version == facts["format_version"]
    assert pack.name == facts["name"] and pack.version == facts.get("version", pack.version)
    assert list(pack.labels) == facts["labels"]
    assert pack.heads.tolist() == facts["heads"]
    assert list(pack.grid) == facts["grid"]
    if "centroids" in facts:
        np.testing.assert_array_equal(pack.centroids, np.asarray(facts["centroids"], dtype=np.float32))
    if "metrics" in facts:
        assert pack.metrics == facts["metrics"]
    assert pack.scoring == facts.get("scoring")
    # The writer is canonical: re-serialising what was read gives the file back, byte for byte.
    assert pack.to_bytes() == (GOLDEN / name).read_bytes()
    assert pack.content_hash() == facts["sha256"]


@pytest.mark.parametrize("name", [name for name in by_outcome("load") if "classify" in EXPECTED[name]])
def test_golden_pack_classifies_as_recorded(name):
    """Labels, votes and probabilities (format 2: calibrated; format 1: the shares, calibrated false)."""
    facts = EXPECTED[name]
    pack = Pack.load(GOLDEN / name)
    case = facts["classify"]
    decision = pack_decision(pack, np.asarray(case["vectors"], dtype=np.float32), method=case["vote"])
    assert decision.predictions.tolist() == case["predictions"]
    assert decision.votes.votes.tolist() == case["votes"]
    np.testing.assert_allclose(decision.probabilities, case["probabilities"], atol=1e-6)
    assert decision.calibrated == case["calibrated"] == (pack.format_version >= 2)
    assert sorted(case["predictions"]) == list(range(len(pack.labels)))  # one input near each class, each recognised


@pytest.mark.parametrize("name", by_outcome("warn"))
def test_unknown_keys_load_with_one_warning_listing_them(name):
    facts = EXPECTED[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pack = Pack.load(GOLDEN / name)
    assert list(pack.labels) == facts["labels"]
    messages = [str(w.message) for w in caught if issubclass(w.category, SavpackWarning)]
    assert len(messages) == 1
    assert all(key in messages[0] for key in facts["unknown_keys"])


@pytest.mark.parametrize("name", by_outcome("refuse"))
def test_refused_packs_name_what_is_wrong(name):
    """A newer format: both versions and the upgrade; a format-2 pack without its scoring model: the key."""
    facts = EXPECTED[name]
    with pytest.raises(PackError) as raised:
        Pack.load(GOLDEN / name)
    assert type(raised.value) is getattr(errors, facts["error"])
    message = str(raised.value)
    assert all(part in message for part in facts["message_contains"])
    if facts["error"] == "PackVersionError":
        assert f"format version {facts['format_version']}" in message
        assert raised.value.key == fmt.META_FORMAT_VERSION


def test_regenerating_gives_the_same_bytes(tmp_path):
    import make_golden_packs

    make_golden_packs.write_golden(tmp_path)
    for name in [*EXPECTED, "expected.json"]:
        assert (tmp_path / name).read_bytes() == (GOLDEN / name).read_bytes(), f"{name} changed: run tools/make_golden_packs.py"


@pytest.mark.slow
def test_reading_golden_packs_needs_no_torch():
    import subprocess

    code = ("import sys, warnings; warnings.simplefilter('ignore'); from savpack_runtime import Pack; "
            f"Pack.load({str(GOLDEN / 'v1-full.safetensors')!r}); "
            "bad = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
