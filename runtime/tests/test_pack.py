import json
import struct
import warnings

import numpy as np
import pytest

from savpack_runtime import Pack, files
from savpack_runtime import format as fmt
from savpack_runtime.errors import (
    OutputPathError,
    PackHeaderError,
    PackMissingKeyError,
    PackReadError,
    PackShapeError,
    PackSizeError,
    PackTypeError,
    PackValueError,
    PackVersionError,
    SavpackWarning,
)


def make_pack(k=3, classes=2, grid=(4, 5, 6), seed=0) -> Pack:
    rng = np.random.default_rng(seed)
    layers, heads, head_dim = grid
    chosen = rng.choice(layers * heads, size=k, replace=False)
    return Pack(
        heads=np.stack([chosen // heads, chosen % heads], axis=1).astype(np.int32),
        centroids=rng.normal(size=(k, classes, head_dim)).astype(np.float32),
        head_scores=rng.uniform(size=k).astype(np.float32),
        class_counts=np.full(classes, 5, dtype=np.int32),
        all_head_scores=rng.uniform(size=(layers, heads)).astype(np.float32),
        labels=tuple(f"class-{i}" for i in range(classes)),
        model={"id": "org/model", "revision": "abc123", "family": "qwen2_vl", "grid": list(grid), "fingerprint": "f" * 64},
        prompt={"template": "Q: {text}", "rendered": "<user>Q: {text}</user>", "image_count": 1, "chat_template_sha256": None},
        selection={"k": k, "scoring": "paper", "vote": "majority"},
        metrics={"train_accuracy": 0.9},
        name="team/pack", version="1.0.0",
        created_by={"savpack": "0.1.0"},
        dataset={"sha256": "0" * 64, "examples": 10, "class_counts": {"class-0": 5, "class-1": 5}},
        scoring={"classifier": "vote", "temperature": 0.1, "sharpness": 2.0, "fitted_on": "cross-validation"},
    )


def test_round_trip_keeps_everything(tmp_path):
    pack = make_pack()
    path = pack.save(tmp_path / "p.safetensors")
    loaded = Pack.load(path)
    for name in ("heads", "centroids", "head_scores", "class_counts", "all_head_scores"):
        assert np.array_equal(getattr(loaded, name), getattr(pack, name)), name
    for name in ("labels", "model", "prompt", "selection", "metrics", "name", "version", "created_by", "dataset", "scoring"):
        assert getattr(loaded, name) == getattr(pack, name), name
    assert loaded.format_version == fmt.FORMAT_VERSION
    assert loaded.content_hash() == pack.content_hash()


def test_writing_is_deterministic_and_readable_by_the_safetensors_library():
    from safetensors.numpy import load

    data = make_pack().to_bytes()
    assert data == make_pack().to_bytes()
    tensors = load(data)
    assert np.array_equal(tensors["heads"], make_pack().heads)
    header_size = struct.unpack("<Q", data[:8])[0]
    assert header_size % 8 == 0


def test_library_written_file_is_readable(tmp_path):
    from safetensors.numpy import save

    tensors, metadata = make_pack().to_tensors_and_metadata()
    assert Pack.from_bytes(save(tensors, metadata=metadata)).labels == make_pack().labels


def test_minimal_legal_pack_one_head_two_classes():
    pack = make_pack(k=1, classes=2, grid=(1, 1, 2)).replace(metrics={}, name=None, version=None, created_by={}, dataset={})
    assert Pack.from_bytes(pack.to_bytes()).k == 1


def test_no_overwrite_without_force(tmp_path):
    path = make_pack().save(tmp_path / "p.safetensors")
    with pytest.raises(OutputPathError, match="--force"):
        make_pack(seed=1).save(path)
    make_pack(seed=1).save(path, force=True)
    assert np.array_equal(Pack.load(path).centroids, make_pack(seed=1).centroids)


def test_output_folder_must_exist(tmp_path):
    with pytest.raises(OutputPathError, match="does not exist"):
        make_pack().save(tmp_path / "missing" / "p.safetensors")


SCORING = '{"classifier":"vote","fitted_on":"cross-validation","sharpness":2.0,"temperature":0.1}'  # make_pack's


def rewrite(pack: Pack, tensors=None, metadata=None, drop=()) -> bytes:
    base_tensors, base_metadata = pack.to_tensors_and_metadata()
    base_tensors.update(tensors or {})
    base_metadata.update(metadata or {})
    for key in drop:
        base_tensors.pop(key, None)
        base_metadata.pop(key, None)
    return files.dumps(base_tensors, base_metadata)


@pytest.mark.parametrize(
    "change, error, key",
    [
        (dict(drop=[fmt.CENTROIDS]), PackMissingKeyError, fmt.CENTROIDS),
        (dict(drop=[fmt.META_LABELS]), PackMissingKeyError, fmt.META_LABELS),
        (dict(drop=[fmt.META_FORMAT]), PackMissingKeyError, fmt.META_FORMAT),
        (dict(metadata={fmt.META_FORMAT_VERSION: "3"}), PackVersionError, fmt.META_FORMAT_VERSION),
        (dict(metadata={fmt.META_FORMAT_VERSION: "one"}), PackTypeError, fmt.META_FORMAT_VERSION),
        (dict(metadata={fmt.META_LABELS: "[not json"}), PackTypeError, fmt.META_LABELS),
        (dict(metadata={fmt.META_LABELS: '["a", 3]'}), PackTypeError, fmt.META_LABELS),
        (dict(metadata={fmt.META_LABELS: '["a", "b", "c"]'}), PackShapeError, fmt.META_LABELS),
        (dict(metadata={fmt.META_LABELS: '["a", "a"]'}), PackValueError, fmt.META_LABELS),
        (dict(metadata={fmt.META_MODEL: '{"id": "m"}'}), PackMissingKeyError, fmt.META_MODEL),
        (dict(tensors={fmt.HEADS: np.array([[0, 0], [1, 1], [9, 0]], np.int32)}), PackValueError, fmt.HEADS),
        (dict(tensors={fmt.HEADS: np.array([[0, 0], [1, 1], [1, 1]], np.int32)}), PackValueError, fmt.HEADS),
        (dict(tensors={fmt.HEADS: np.zeros((3, 2), np.int64)}), PackTypeError, fmt.HEADS),
        (dict(tensors={fmt.CENTROIDS: np.full((3, 2, 6), np.nan, np.float32)}), PackValueError, fmt.CENTROIDS),
        (dict(tensors={fmt.CENTROIDS: np.zeros((3, 3, 6), np.float32)}), PackShapeError, fmt.META_LABELS),
        (dict(tensors={fmt.CENTROIDS: np.zeros((3, 2, 5), np.float32)}), PackShapeError, fmt.CENTROIDS),
        (dict(tensors={fmt.ALL_HEAD_SCORES: np.zeros((4, 4), np.float32)}), PackShapeError, fmt.ALL_HEAD_SCORES),
        (dict(tensors={fmt.CLASS_COUNTS: np.array([0, 5], np.int32)}), PackValueError, fmt.CLASS_COUNTS),
        # format 2: the scoring model (docs/format.md section 4, rows 9, 12, 14, 15)
        (dict(drop=[fmt.META_SCORING]), PackMissingKeyError, fmt.META_SCORING),
        (dict(metadata={fmt.META_SCORING: SCORING.replace('"vote"', '"forest"')}), PackValueError, fmt.META_SCORING),
        (dict(metadata={fmt.META_SCORING: SCORING.replace('"temperature":0.1', '"temperature":0')}), PackValueError, fmt.META_SCORING),
        (dict(metadata={fmt.META_SCORING: SCORING.replace('"sharpness":2.0', '"sharpness":"2"')}), PackValueError, fmt.META_SCORING),
        (dict(metadata={fmt.META_SCORING: SCORING.replace('"cross-validation"', '"hope"')}), PackValueError, fmt.META_SCORING),
        (dict(metadata={fmt.META_SCORING: '{"classifier":"vote"}'}), PackMissingKeyError, fmt.META_SCORING),
        (dict(metadata={fmt.META_SCORING: SCORING.replace('"vote"', '"probe"')}), PackMissingKeyError, fmt.PROBE_WEIGHT),
        (dict(tensors={fmt.PROBE_WEIGHT: np.zeros((2, 18), np.float32), fmt.PROBE_BIAS: np.zeros(2, np.float32)}),
         PackValueError, fmt.PROBE_WEIGHT),
        (dict(metadata={fmt.META_SCORING: SCORING.replace('"vote"', '"probe"')},
              tensors={fmt.PROBE_WEIGHT: np.zeros((2, 17), np.float32), fmt.PROBE_BIAS: np.zeros(2, np.float32)}),
         PackShapeError, fmt.PROBE_WEIGHT),
        (dict(metadata={fmt.META_SCORING: SCORING.replace('"vote"', '"probe"')},
              tensors={fmt.PROBE_WEIGHT: np.full((2, 18), np.inf, np.float32), fmt.PROBE_BIAS: np.zeros(2, np.float32)}),
         PackValueError, fmt.PROBE_WEIGHT),
    ],
)
def test_each_failure_has_its_named_error(change, error, key):
    with pytest.raises(error) as raised:
        Pack.from_bytes(rewrite(make_pack(), **change), path="bad.safetensors")
    assert raised.value.key == key
    assert "bad.safetensors" in str(raised.value)


def test_make_packs_scoring_is_as_written():
    assert make_pack().to_tensors_and_metadata()[1][fmt.META_SCORING] == SCORING


def test_a_format_1_pack_ignores_format_2_keys_with_one_warning():
    """Version 1 knows no scoring: its keys are unknown there, warned about and ignored (not half-applied)."""
    data = rewrite(make_pack(), metadata={fmt.META_FORMAT_VERSION: "1"})
    with pytest.warns(SavpackWarning, match="savpack.scoring"):
        pack = Pack.from_bytes(data, path="old.safetensors")
    assert pack.format_version == 1 and pack.scoring is None and pack.scoring_model is None


def test_newer_version_message_names_both_versions_and_the_upgrade():
    with pytest.raises(PackVersionError) as raised:
        Pack.from_bytes(rewrite(make_pack(), metadata={fmt.META_FORMAT_VERSION: "7"}))
    assert "7" in str(raised.value) and str(fmt.FORMAT_VERSION) in str(raised.value)
    assert "pip install --upgrade savpack-runtime" in str(raised.value)


def test_unknown_keys_give_one_warning_listing_them():
    data = rewrite(make_pack(), tensors={"extra": np.zeros(1, np.float32)}, metadata={"savpack.future": "x"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Pack.from_bytes(data)
    ours = [w for w in caught if issubclass(w.category, SavpackWarning)]
    assert len(ours) == 1 and "extra" in str(ours[0].message) and "savpack.future" in str(ours[0].message)


def test_byte_level_damage():
    data = make_pack().to_bytes()
    with pytest.raises(PackSizeError, match="shorter than"):
        Pack.from_bytes(data[:5])
    with pytest.raises(PackSizeError, match="truncated"):
        Pack.from_bytes(data[:-4])
    with pytest.raises(PackSizeError, match="trailing"):
        Pack.from_bytes(data + b"\0\0")
    with pytest.raises(PackSizeError, match="header claims"):
        Pack.from_bytes(struct.pack("<Q", 10**9) + data[8:])
    header_size = struct.unpack("<Q", data[:8])[0]
    with pytest.raises(PackHeaderError, match="not valid JSON"):
        Pack.from_bytes(data[:8] + b"x" + data[9 : 8 + header_size] + data[8 + header_size :])


def test_header_with_duplicate_keys_is_refused():
    body = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    with pytest.raises(PackHeaderError, match="duplicate"):
        Pack.from_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 4)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(PackReadError, match="does not exist"):
        Pack.load(tmp_path / "nope.safetensors")
    with pytest.raises(PackReadError, match="folder"):
        Pack.load(tmp_path)


def test_metadata_json_round_trip_of_nested_values():
    pack = make_pack().replace(metrics={"held_out": {"accuracy": 0.75, "examples": 40}})
    assert Pack.from_bytes(pack.to_bytes()).metrics == {"held_out": {"accuracy": 0.75, "examples": 40}}
    assert json.loads(pack.to_tensors_and_metadata()[1][fmt.META_METRICS]) == pack.metrics
