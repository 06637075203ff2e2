"""Write the golden packs under exported/packs/: tiny, deterministic packs of every format version this savpack
reads, plus the cases a reader must refuse or warn about, and expected.json describing what a reader must find.

Other-language readers test against these files (docs/format.md); runtime/tests/test_golden_packs.py reads them
without torch and checks that running this tool again gives the same bytes.

    python tools/make_golden_packs.py [--out exported/packs] [--check]

Needs only savpack-runtime (numpy). Prints a table and writes expected.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from savpack_runtime import Pack, files
from savpack_runtime import format as fmt
from savpack_runtime.scoring import pack_decision

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "exported" / "packs"
GRID = (4, 4, 8)  # layers, heads, head_dim
LABELS = ("cold", "shape", "warm")
K = 3


def example_pack(name: str | None = "golden/colours", version: str | None = "1.0.0", seed: int = 0,
                 labels: tuple[str, ...] = LABELS) -> Pack:
    """A small valid pack with deterministic numbers (no model): for golden files and tests of sharing."""
    rng = np.random.default_rng(seed)
    layers, heads, head_dim = GRID
    all_scores = np.round(rng.uniform(0.3, 1.0, size=(layers, heads)), 4).astype(np.float32)
    order = np.lexsort((np.arange(layers * heads), -all_scores.reshape(-1)))[:K]  # best first, ties by index
    chosen = np.stack([order // heads, order % heads], axis=1).astype(np.int32)
    centroids = np.round(rng.normal(size=(K, len(labels), head_dim)), 4).astype(np.float32)
    full = name is not None
    return Pack(
        heads=chosen, centroids=centroids, head_scores=all_scores[chosen[:, 0], chosen[:, 1]],
        class_counts=np.full(len(labels), 8, dtype=np.int32), all_head_scores=all_scores, labels=labels,
        model={"id": "golden-org/tiny-model", "revision": "0123456789abcdef0123456789abcdef01234567",
               "family": "causal_lm", "grid": list(GRID), "fingerprint": hashlib.sha256(b"golden weights").hexdigest()},
        prompt={"template": "Which kind of words? {text}", "rendered": "<|user|>Which kind of words? {text}<|assistant|>",
                "image_count": 0, "chat_template_sha256": hashlib.sha256(b"golden template").hexdigest()},
        selection={"k": K, "scoring": "paper", "vote": "majority", "head_score": "labelled-set accuracy"},
        metrics={"train_accuracy": 1.0, "held_out_accuracy": 0.75, "held_out_examples": 12} if full else {},
        name=name, version=version,
        created_by={"savpack": "0.1.0", "savpack-runtime": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0"} if full else {},
        dataset={"sha256": hashlib.sha256(b"golden data").hexdigest(), "examples": 8 * len(labels),
                 "class_counts": {label: 8 for label in labels}} if full else {},
    )


def calibrated_pack(classifier: str) -> Pack:
    """example_pack with a scoring model (format 2): a vote pack's head calibration, or a probe with its tensors."""
    pack = example_pack(name=f"golden/colours-{classifier}", seed=2)
    if classifier == "vote":
        return pack.replace(scoring={"classifier": "vote", "temperature": 0.5, "sharpness": 1.5,
                                     "fitted_on": "cross-validation"})
    # The linear head of the summed cosine (each class's row: its unit centroids, concatenated), plus a small bias:
    # one input near each class is then recognised, as for the vote.
    units = np.asarray(pack.centroids, dtype=np.float64)
    units = units / np.linalg.norm(units, axis=-1, keepdims=True)  # (k, C, D)
    weight = np.round(4 * units.transpose(1, 0, 2).reshape(len(LABELS), -1), 4).astype(np.float32)
    bias = np.round(np.random.default_rng(3).normal(scale=0.1, size=len(LABELS)), 4).astype(np.float32)
    return pack.replace(scoring={"classifier": "probe", "temperature": 3.0, "sharpness": 1.0,
                                 "fitted_on": "cross-validation"}, probe_weight=weight, probe_bias=bias)


def near_each_class(pack: Pack) -> np.ndarray:
    """(C, k, D) inputs: each class's centroids plus a little seeded noise, rounded to 4 decimals."""
    vectors = (np.asarray(pack.centroids).transpose(1, 0, 2)
               + np.float32(0.1) * np.random.default_rng(7).normal(size=(len(LABELS), K, GRID[2])).astype(np.float32))
    return np.round(vectors, 4).astype(np.float32)


def _expected_decision(pack: Pack) -> dict[str, Any]:
    """What a reader must compute for one input near each class (docs/format.md section 5): labels, votes and
    probabilities."""
    vectors = near_each_class(pack)
    decision = pack_decision(pack, vectors)
    return {"vectors": vectors.tolist(), "vote": "majority", "predictions": decision.predictions.tolist(),
            "votes": decision.votes.votes.tolist(), "probabilities": np.round(decision.probabilities, 7).tolist(),
            "calibrated": decision.calibrated}


def _raw(pack: Pack, extra_metadata: dict[str, str] | None = None, format_version: str | None = None) -> bytes:
    """Serialise around the writer's own checks, for the files a reader must warn about or refuse."""
    tensors, metadata = pack.to_tensors_and_metadata()
    metadata.update(extra_metadata or {})
    if format_version is not None:
        metadata[fmt.META_FORMAT_VERSION] = format_version
    return files.dumps(tensors, metadata)


def golden_files() -> dict[str, tuple[bytes, dict[str, Any]]]:
    """file name -> (bytes, what a reader must do with it)."""
    full, minimal = example_pack(), example_pack(name=None, version=None, seed=1)
    unknown = {"savpack.future_note": "a key a newer writer added"}
    calibrated = {classifier: calibrated_pack(classifier) for classifier in ("vote", "probe")}
    return {
        "v1-full.safetensors": (full.to_bytes(), {
            "outcome": "load", "format_version": 1, "name": full.name, "version": full.version,
            "labels": list(full.labels), "heads": full.heads.tolist(), "grid": list(GRID),
            "centroids": full.centroids.tolist(), "metrics": full.metrics,
            "classify": _expected_decision(full),
        }),
        "v1-minimal.safetensors": (minimal.to_bytes(), {
            "outcome": "load", "format_version": 1, "name": None, "version": None, "labels": list(minimal.labels),
            "heads": minimal.heads.tolist(), "grid": list(GRID), "centroids": minimal.centroids.tolist(), "metrics": {},
        }),
        "v1-unknown-key.safetensors": (_raw(full, unknown), {
            "outcome": "warn", "format_version": 1, "unknown_keys": sorted(unknown), "labels": list(full.labels),
        }),
        **{f"v2-{classifier}.safetensors": (pack.to_bytes(), {
            "outcome": "load", "format_version": 2, "name": pack.name, "labels": list(pack.labels),
            "heads": pack.heads.tolist(), "grid": list(GRID), "scoring": pack.scoring,
            "classify": _expected_decision(pack),
        }) for classifier, pack in calibrated.items()},
        "v2-no-scoring.safetensors": (_raw(full, format_version="2"), {
            "outcome": "refuse", "error": "PackMissingKeyError", "format_version": 2,
            "message_contains": [fmt.META_SCORING],
        }),
        "v3-newer.safetensors": (_raw(calibrated["vote"], format_version="3"), {
            "outcome": "refuse", "error": "PackVersionError", "format_version": 3,
            "message_contains": ["3", str(fmt.FORMAT_VERSION), "pip install --upgrade savpack-runtime"],
        }),
    }


def write_golden(out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Any] = {"reader_format_version": fmt.FORMAT_VERSION, "files": {}}
    for file_name, (data, facts) in golden_files().items():
        files.atomic_write(out / file_name, lambda handle, data=data: handle.write(data), force=True)
        expected["files"][file_name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), **facts}
    text = json.dumps(expected, indent=1, sort_keys=True) + "\n"
    files.atomic_write(out / "expected.json", lambda handle: handle.write(text.encode()), force=True)
    return expected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="Do not write: fail if the files in --out differ.")
    args = parser.parse_args()
    if args.check:
        stale = [name for name, (data, _) in golden_files().items()
                 if not (args.out / name).is_file() or (args.out / name).read_bytes() != data]
        print("golden packs up to date" if not stale else f"stale golden packs: {stale}")
        return 1 if stale else 0
    expected = write_golden(args.out)
    print(f"{'file':<28} {'bytes':>6}  {'outcome':<7}  sha256")
    for name, facts in expected["files"].items():
        print(f"{name:<28} {facts['size']:>6}  {facts['outcome']:<7}  {facts['sha256'][:16]}")
    print(f"wrote {args.out}/expected.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
