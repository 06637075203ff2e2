"""Make exported/bundles/: golden bundles from tiny deterministic fixtures, with their inputs, expected head vectors and labels.

    python tools/make_exported.py [--out exported/bundles] [--force]

For each case (one per graph kind and preprocessing: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, LLaVA-1.5,
Gemma 3 image-text, SmolVLM, and the text-only Qwen2, Gemma 3, GPT-2 and BERT fixtures, random weights from seed 0):
build packs
on a generated labelled set, export a bundle, and record what the builder computes on a few fixed items:

    exported/bundles/<case>/bundle/        the bundle (savpack export)
    exported/bundles/<case>/items.jsonl    the items (text, images relative to the file), images in items/
    exported/bundles/<case>/inputs.npz     the items encoded by LoadedModel.encode: "all.*" every item in one batch, image
                                   counts mixed ("all.order" = item indices), "first.*" item 0 alone
    exported/bundles/<case>/expected.npz   head_vectors (items, k, head_dim) from hooks on the PyTorch model (graph heads)
    exported/bundles/<case>/expected.json  prompts, and each pack's labels, votes and shares from savpack.pipeline.classify
    exported/bundles/manifest.json         versions used, file sizes, graph digests

The runtime's tests (runtime/tests/test_runtime_exported.py) check themselves against these files without torch; the
builder's test tests/test_exported_regenerate.py regenerates them and checks that they agree. With the same torch,
transformers and onnx versions the graph bytes are identical (see docs/export.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from savpack_runtime.errors import OutputPathError
from savpack_runtime.files import staged_folder

ROOT = Path(__file__).resolve().parent.parent

# Per case: the fixture, the packs' prompt, the export options, the packs (pack_from_activations settings, and
# format_1: the pack without its scoring model, as packs were before calibration) and what the case covers (README).
CASES: dict[str, dict[str, Any]] = {
    "qwen2_vl": {"fixture": "qwen2_vl", "template": "Question: {text}", "selected_heads_only": False,
                 "packs": {"colour": {"k": 6}, "colour-loo": {"k": 4, "scoring": "loo", "classifier": "probe"}},
                 "covers": "two packs, one forward (the graph returns the union of their heads); the second a probe"},
    "llava_onevision": {"fixture": "llava_onevision", "template": "{text}", "selected_heads_only": True,
                        "packs": {"colour": {"k": 6}}, "covers": "anyres tiles as a planned gather; selected heads only"},
    "qwen2": {"fixture": "qwen2", "template": "Classify: {text}", "selected_heads_only": False,
              "packs": {"words": {"k": 6, "vote": "weighted", "classifier": "vote"}},
              "covers": "a text decoder with a chat template (left padding); heads voting with their scores as weights"},
    "qwen2_5_vl": {"fixture": "qwen2_5_vl", "template": "Question: {text}", "selected_heads_only": False,
                   "packs": {"colour": {"k": 6, "vote": "probability", "classifier": "vote"}},
                   "covers": "window attention in the vision tower: the items' images span full and partial windows; "
                             "the label by the calibrated probabilities"},
    "llava": {"fixture": "llava", "template": "{text}", "selected_heads_only": True, "packs": {"colour": {"k": 6}},
              "covers": "CLIP tower, shortest-edge resize and center crop in the runtime's preprocessing"},
    "gemma3_text": {"fixture": "gemma3_text", "template": "Classify: {text}", "selected_heads_only": False,
                    "packs": {"words": {"k": 6, "format_1": True}},
                    "covers": "sliding-window and global layers, q/k and sandwich norms, scaled embeddings: the real "
                              "Gemma-3-270M's layout; a format-1 pack (no scoring model: its probabilities are the "
                              "vote shares)"},
    "gpt2": {"fixture": "gpt2", "template": "Classify: {text}", "selected_heads_only": False,
             "packs": {"words": {"k": 6, "classifier": "probe"}},
             "covers": "learned positions counted from the mask (left padding), no chat template; a probe pack"},
    "bert": {"fixture": "bert", "template": "{text}", "selected_heads_only": False, "token_position": "first",
             "packs": {"words": {"k": 6, "vote": "cosine", "classifier": "vote"}},
             "covers": "an encoder read at [CLS], right padding, segment ids; a cosine vote"},
    "gemma3": {"fixture": "gemma3", "template": "Question: {text}", "selected_heads_only": True,
               "packs": {"colour": {"k": 6}}, "covers": "fixed-size SigLIP images, image tokens attending to each other"},
    "smolvlm": {"fixture": "smolvlm", "template": "{text}", "selected_heads_only": False, "packs": {"colour": {"k": 6}},
                "covers": "tiles and a global view per image, frames padded per item (Idefics3's graph kind)"},
    "qwen3_vl": {"fixture": "qwen3_vl", "template": "Question: {text}", "selected_heads_only": False,
                 "packs": {"colour": {"k": 6}},
                 "covers": "learned position embeddings resampled per grid, interleaved M-RoPE, DeepStack"},
}
# (text, [(width, height, (r, g, b)), ...]) per item; texts and sizes differ so one batch mixes lengths and grids.
IMAGE_ITEMS = [
    ("What colour is this picture?", [(56, 84, (200, 40, 40))]),
    ("colour?", [(112, 42, (40, 170, 60))]),
    ("Which colour does the large photo show here?", [(70, 70, (40, 70, 200))]),
    ("two pictures: what colour?", [(56, 56, (210, 50, 60)), (84, 56, (190, 30, 30))]),
    ("is it blue", [(42, 98, (50, 60, 190))]),
]
TEXT_ITEMS = ["the red sun is here", "blue ice and snow", "a circle", "the square and the triangle dot is here",
              "yellow fire fire sun"]
TEXT_TRAIN = {"warm": ["red sun", "yellow fire", "the sun is red", "fire and sun"],
              "cold": ["blue ice", "green snow", "the ice is blue", "snow and ice"],
              "shape": ["a circle", "the square", "triangle dot", "a dot and a square"]}


def _write_images(folder: Path, items: list[tuple[str, list]], stem: str) -> list[dict[str, Any]]:
    """Smooth gradients with a little noise: small PNGs, yet every image differs."""
    from PIL import Image

    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index, (text, images) in enumerate(items):
        paths = []
        for number, (width, height, rgb) in enumerate(images):
            ramp = np.linspace(0.7, 1.1, width)[None, :, None]
            pixels = np.clip(np.array(rgb) * ramp + rng.normal(0, 6, size=(height, width, 3)), 0, 255).astype(np.uint8)
            name = f"{stem}-{index}-{number}.png"
            Image.fromarray(pixels).save(folder / name, optimize=True)
            paths.append(f"{folder.name}/{name}")
        records.append({"text": text, "images": paths})
    return records


def _train_file(takes_images: bool, work: Path) -> Path:
    from savpack.testing import write_colour_task

    if takes_images:
        return write_colour_task(work, per_class=4, seed=1, name="train")
    path = work / "train.jsonl"
    path.write_text("".join(json.dumps({"text": text, "label": label}) + "\n"
                            for label, texts in TEXT_TRAIN.items() for text in texts))
    return path


def make_case(name: str, case: dict[str, Any], folder: Path, work: Path) -> dict[str, Any]:
    import savpack
    from savpack.data import load_examples
    from savpack.export.bundle import export_bundle
    from savpack.export.validate import encode_examples
    from savpack.extract import extract
    from savpack.testing import build_fixture
    from savpack.models import load_model
    from savpack.pipeline import classify, extract_activations, pack_from_activations

    model_dir = build_fixture(case["fixture"], work / f"{name}-model", seed=0)
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    loaded.model_id = f"savpack-fixtures/{case['fixture']}"  # not the temporary folder it was built in
    token_position = case.get("token_position", "last")
    activations = extract_activations(loaded, load_examples(_train_file(loaded.family.takes_images, work)), case["template"],
                                      progress=False, token_position=token_position)
    packs = []
    for pack_name, settings in case["packs"].items():
        settings = dict(settings)
        format_1 = settings.pop("format_1", False)
        pack = pack_from_activations(activations, name=f"golden/{name}-{pack_name}", version="1.0.0", **settings)
        if format_1:
            pack = pack.replace(scoring=None, probe_weight=None, probe_bias=None)
        # Stable bytes across commits: the pack records the tool, not the git commit that ran it.
        packs.append(pack.replace(created_by={"savpack": savpack.__version__, "made_by": "tools/make_exported.py"}))

    folder.mkdir(parents=True)
    result = export_bundle(loaded, packs, folder / "bundle", names=list(case["packs"]),
                           selected_heads_only=case["selected_heads_only"])
    graph_heads = np.asarray(result.info["graph"]["heads"])

    if loaded.family.takes_images:
        records = _write_images(folder / "items", IMAGE_ITEMS, name)
    else:
        records = [{"text": text, "images": []} for text in TEXT_ITEMS]
    (folder / "items.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    examples = load_examples(folder / "items.jsonl", require_labels=False)

    template = case["template"]
    prompts = [loaded.render(template, example.text, len(example.images)) for example in examples]
    vectors = extract(loaded, examples, template, heads=graph_heads, batch_size=len(examples), progress=False,
                      token_position=token_position).vectors
    np.savez_compressed(folder / "expected.npz", head_vectors=vectors.astype(np.float32))
    # One batch of every item (lengths, image sizes and image counts mixed), by image count, then prompt length.
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].images), len(prompts[i])))
    inputs = {"all.order": np.asarray(order, dtype=np.int64)}
    for key, batch in (("all", [examples[i] for i in order]), ("first", examples[:1])):
        inputs.update({f"{key}.{tensor}": value for tensor, value in encode_examples(loaded, batch, template).items()})
    np.savez_compressed(folder / "inputs.npz", **inputs)

    expected: dict[str, Any] = {"prompts": prompts, "packs": {}}
    for pack_name, pack in zip(case["packs"], packs):
        classification = classify(loaded, pack, examples, batch_size=len(examples), progress=False)
        expected["packs"][pack_name] = {"labels": classification.labels, "records": classification.records(pack)}
    (folder / "expected.json").write_text(json.dumps(expected, indent=2, ensure_ascii=False) + "\n")
    return {"graph_sha256": result.info["graph"]["sha256"], "graph_data_sha256": result.info["graph"]["data_sha256"],
            "kind": result.info["graph"]["kind"],
            "packs": [{"name": pack_name, "classifier": pack.classifier, "vote": pack.selection.get("vote", "majority"),
                       "k": pack.k, "calibrated": pack.scoring_model is not None} for pack_name, pack in zip(case["packs"], packs)],
            "heads": graph_heads.tolist(), "validation_max_difference": result.validation.max_difference,
            "bytes": {path: size for path, size in result.sizes.items()}}


def make_all(out: Path, force: bool = False, cases: list[str] | None = None) -> dict[str, Any]:
    """Write every case into `out` (replaced as a whole: built beside it, then renamed)."""
    import onnx
    import onnxruntime
    import torch
    import transformers

    torch.set_num_threads(1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "made_by": "tools/make_exported.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "cases": {},
    }
    with staged_folder(out, force, marker="manifest.json") as staging, tempfile.TemporaryDirectory(prefix="savpack-golden-") as work:
        for name in cases or list(CASES):
            manifest["cases"][name] = make_case(name, CASES[name], staging / name, Path(work) / name)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (staging / "README.md").write_text(readme(manifest))
    return manifest


def readme(manifest: dict[str, Any]) -> str:
    """exported/bundles/README.md: what each case holds and covers."""
    rows = []
    for name, case in manifest["cases"].items():
        packs = ", ".join(f"`{pack['name']}` ({pack['classifier']}, {pack['vote']} vote, k {pack['k']}, "
                          f"{'calibrated' if pack['calibrated'] else 'not calibrated'})" for pack in case["packs"])
        rows.append(f"| `{name}` | {case['kind']} | {packs} | {CASES[name]['covers']} |")
    return "\n".join([
        "# exported/bundles/", "",
        "Golden bundles made by `python tools/make_exported.py --force` from tiny random-weight fixtures (the tool's "
        "docstring gives the layout of each case folder). Do not edit by hand: regenerate. The runtime's tests check "
        "themselves against them without torch (`runtime/tests/test_runtime_exported.py`, and the Node.js client's "
        "`runtime/tests/test_node_example.py` on the text cases); `tests/test_exported_regenerate.py` regenerates them.",
        "", "Each bundle's graph returns `head_vectors`, then per pack its `cosines`, `votes`, `prediction` (the pack's "
        "label) and `probabilities` (docs/export.md, \"The graph contract\").", "",
        "| case | graph kind | packs | covers |", "|---|---|---|---|", *rows, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "exported" / "bundles"), help="folder to write (default: exported/bundles)")
    parser.add_argument("--force", action="store_true", help="replace the folder if it exists")
    args = parser.parse_args()
    try:
        manifest = make_all(Path(args.out), args.force)
    except OutputPathError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"{'case':<16} {'heads':>5} {'bundle bytes':>13} {'max |graph - model|':>20}")
    for name, case in manifest["cases"].items():
        size = sum(size for path, size in case["bytes"].items())
        print(f"{name:<16} {len(case['heads']):>5} {size:>13} {case['validation_max_difference']:>20.2e}")
    total = sum(path.stat().st_size for path in Path(args.out).rglob("*") if path.is_file())
    print(f"wrote {args.out}: {total} bytes")


if __name__ == "__main__":
    main()
