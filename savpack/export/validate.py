"""Export-time validation: the graph against hooks on the full PyTorch model, on inputs the graph was not traced on.

The reference is savpack.extract.extract with the graph's heads: forward-pre-hooks on the real Hugging Face model's
attention output projections, the model's own forward, nothing of the export code. The inputs are fresh: other
texts, other image sizes (so other patch grids and anyres layouts), other batch sizes and image counts than the
example the graph was traced on (a traced graph that baked a shape or a grid in would pass on its own example).
Every mismatch is collected before failing, so one run shows the whole picture.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from savpack_runtime import graph_inputs
from savpack_runtime.errors import SavpackError
from savpack_runtime.images import load_image
from savpack_runtime.items import Example
from savpack_runtime.pack import Pack
from savpack_runtime.session import GraphSession
from savpack_runtime.scoring import pack_decision
from savpack_runtime.vote import cosine_to_centroids

from ..errors import ExportError
from ..extract import extract
from ..models import LoadedModel

DEFAULT_TOLERANCE = 1e-4  # float32 weights: max |graph - model| per value, also relative to the value's size
FLOAT16_TOLERANCE = 2e-2  # float16 weights round each weight to 11 significant bits
SCORE_TOLERANCE = 1e-6  # the in-graph cosines and probabilities against numpy's, on the same head vectors

# Word lists for the texts: common English, so every tokenizer splits them into ordinary pieces.
_WORDS = "what is the colour shape of this picture a red blue green small large circle square photo shows here".split()

# (width, height) of the images. The example the graph is traced on and the validation batches never share a size.
EXAMPLE_SIZES = ((84, 56), (56, 140), (100, 72))
VALIDATION_SIZES = ((200, 70), (98, 98), (60, 180), (150, 150), (70, 120), (120, 60))


class ExportValidationError(ExportError):
    """The exported graph disagrees with the model; `mismatches` lists every disagreement found."""

    def __init__(self, mismatches: list["Mismatch"], tolerance: float):
        self.mismatches = mismatches
        shown = "\n".join(f"  - {item}" for item in mismatches[:20])
        more = f"\n  ... and {len(mismatches) - 20} more" if len(mismatches) > 20 else ""
        super().__init__(f"the exported graph disagrees with the model on {len(mismatches)} value group(s) "
                         f"(tolerance {tolerance:g}):\n{shown}{more}")


@dataclass(frozen=True)
class Mismatch:
    batch: str  # which validation batch
    item: int | None  # item within the batch (None: the whole batch failed)
    head: tuple[int, int] | None  # (layer, head)
    difference: float  # max |graph - model| over the head's values (inf when the batch failed)
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.batch}" + (f", item {self.item}" if self.item is not None else "")
        where += f", head {list(self.head)}" if self.head is not None else ""
        return f"{where}: {self.detail or f'max difference {self.difference:.3g}'}"


def check_tolerance(tolerance: float) -> float:
    """A validation tolerance must be a finite number above 0: NaN compares false with everything, so a NaN
    tolerance would let any graph pass."""
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise ExportError(f"tolerance must be a finite number above 0, got {tolerance!r}")
    return float(tolerance)


@dataclass
class ValidationReport:
    batches: list[dict[str, Any]] = field(default_factory=list)  # name, items, shapes, max_difference
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def max_difference(self) -> float:
        return max((batch["max_difference"] for batch in self.batches), default=0.0)


def make_examples(count: int, image_count: int, sizes: Sequence[tuple[int, int]], folder: Path, seed: int,
                  extra_image_item: int | None = None) -> list[Example]:
    """`count` items with texts of different lengths and `image_count` images each (item `extra_image_item` gets one
    more), drawn deterministically from `seed`, images written as PNG files into `folder`."""
    rng = np.random.default_rng(seed)
    examples, size_index = [], 0
    for item in range(count):
        words = rng.choice(_WORDS, size=int(rng.integers(1, 4 + 4 * item)))
        paths = []
        for _ in range(image_count + (1 if item == extra_image_item else 0)):
            width, height = sizes[size_index % len(sizes)]
            size_index += 1
            base = rng.integers(0, 256, size=3)
            pixels = np.clip(base + rng.normal(0, 60, size=(height, width, 3)), 0, 255).astype(np.uint8)
            path = folder / f"item-{seed}-{item}-{len(paths)}.png"
            Image.fromarray(pixels).save(path)
            paths.append(str(path))
        examples.append(Example(" ".join(words), tuple(paths), None, f"validation:{seed}:{item}"))
    return examples


def encode_examples(loaded: LoadedModel, examples: Sequence[Example], template: str) -> dict[str, np.ndarray]:
    """The batch as the preprocessor encodes it (LoadedModel.encode), as numpy arrays."""
    prompts = [loaded.render(template, example.text, len(example.images)) for example in examples]
    images = [[load_image(path) for path in example.images] for example in examples]
    return {name: value.cpu().numpy() for name, value in loaded.encode(prompts, images).items()}


def validation_batches(image_count: int, folder: Path) -> dict[str, list[Example]]:
    """Batch 1 with the largest text, and a mixed batch: four lengths, image sizes, one item with an extra image."""
    return {
        "batch of 1": make_examples(1, image_count, VALIDATION_SIZES[3:4], folder, seed=11),
        # 4 items: the graph was traced on 3, so a batch size baked into it shows here.
        "mixed batch of 4": make_examples(4, image_count, VALIDATION_SIZES[:3] + VALIDATION_SIZES[4:], folder, seed=12,
                                          extra_image_item=1 if image_count else None),
    }


def validate_graph(session: GraphSession, loaded: LoadedModel, kind: str, plan_config: dict[str, Any],
                   heads: np.ndarray, template: str, image_count: int, tolerance: float = DEFAULT_TOLERANCE,
                   batches: dict[str, list[Example]] | None = None, token_position: str = "last",
                   packs: Sequence[tuple[Pack, np.ndarray]] = ()) -> ValidationReport:
    """Run graph and model on fresh batches; raise ExportValidationError listing every mismatch.

    packs: (pack, positions in the graph's heads) in bundle order, for graphs that vote inside (scored graphs): each
    pack's in-graph cosines, votes and prediction must equal the numpy vote on the graph's own head vectors."""
    heads = np.asarray(heads)
    report, mismatches = ValidationReport(tolerance=tolerance), []
    with tempfile.TemporaryDirectory(prefix="savpack-validate-") as tmp:
        batches = batches if batches is not None else validation_batches(image_count, Path(tmp))
        for name, examples in batches.items():
            expected = extract(loaded, examples, template, heads=heads, batch_size=len(examples), progress=False,
                               token_position=token_position).vectors
            try:
                feed = graph_inputs.plan(kind, plan_config, encode_examples(loaded, examples, template))
                outputs = session.run_all(feed)
            except SavpackError as exc:
                mismatches.append(Mismatch(name, None, None, float("inf"), f"graph failed: {exc}"))
                continue
            found = outputs[graph_inputs.OUTPUT_NAME]
            mismatches += score_mismatches(name, outputs, packs)
            if found.shape != expected.shape:
                mismatches.append(Mismatch(name, None, None, float("inf"), f"graph returned shape {list(found.shape)}, "
                                           f"the model {list(expected.shape)}"))
                continue
            difference = np.abs(found.astype(np.float64) - expected)  # (B, k, d)
            allowed = tolerance * (1.0 + np.abs(expected))
            for item, position in zip(*np.nonzero((difference > allowed).any(axis=2) | ~np.isfinite(found).all(axis=2))):
                mismatches.append(Mismatch(name, int(item), tuple(int(v) for v in heads[position]),
                                           float(difference[item, position].max())))
            report.batches.append({"name": name, "items": len(examples),
                                   "shapes": {key: list(np.shape(value)) for key, value in feed.items()},
                                   "max_difference": float(np.nanmax(difference)) if difference.size else 0.0})
    if mismatches:
        raise ExportValidationError(mismatches, tolerance)
    return report


def score_mismatches(batch: str, outputs: dict[str, np.ndarray], packs: Sequence[tuple[Pack, np.ndarray]]) -> list[Mismatch]:
    """Each pack's in-graph scores against savpack_runtime's numpy rules on the graph's own head vectors: cosines
    (SCORE_TOLERANCE), then votes, label (exactly) and probabilities (SCORE_TOLERANCE) from those cosines."""
    vectors, mismatches = outputs[graph_inputs.OUTPUT_NAME], []
    for index, (pack, positions) in enumerate(packs):
        names = graph_inputs.score_outputs(index)
        cosines = outputs[names["cosines"]]
        reference = pack_decision(pack, vectors[:, positions], similarities=cosines)
        checks = {"cosines": float(np.abs(cosines - cosine_to_centroids(vectors[:, positions], pack.centroids)).max())
                  <= SCORE_TOLERANCE,
                  "votes": np.array_equal(outputs[names["votes"]], reference.votes.votes),
                  "prediction": np.array_equal(outputs[names["prediction"]], reference.predictions),
                  "probabilities": float(np.abs(outputs[names["probabilities"]] - reference.probabilities).max())
                  <= SCORE_TOLERANCE}
        mismatches += [Mismatch(batch, None, None, float("inf"), f"pack {pack.name or index}: in-graph {role} differ from "
                                "savpack_runtime's numpy scores") for role, equal in checks.items() if not equal]
    return mismatches
