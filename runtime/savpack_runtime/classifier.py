"""Classify with a bundle: preprocessing, the truncated graph in onnxruntime, and each pack's vote. No torch.

    from savpack_runtime import Classifier

    classifier = Classifier.load("bundle/")                      # providers="cuda" to use a GPU when one works
    result = classifier.classify(text="What colour is this?", images=["photo.jpg"])
    result.label, result.probabilities, result.votes, result.by_pack   # by_pack: one result per pack in the bundle
    results = classifier.classify_batch([{"text": "...", "images": ["a.png"]}, ("another", ["b.png"])],
                                        abstain_below=0.8)          # label None where the top probability is lower

One forward serves every pack of the bundle: the graph returns the union of their heads and (bundle format 2) each
pack's vote and probabilities, computed inside the graph. The numpy vote and scoring (savpack_runtime.vote, .scoring)
are the reference the in-graph scores are tested against; the classifier computes with them only what a bundle's
graph does not (format 1: everything from the head vectors; format-2 bundles written before the probabilities moved
into the graph: the probabilities). Every pack's decision (label, probabilities, abstention) goes through
savpack_runtime.scoring.decide, as in the builder.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from . import graph_inputs
from .batching import plan_batches
from .bundle import Bundle, BundlePack, check_graph_metadata
from .errors import GraphError, InputError, SavpackError
from .images import ImageBytes, load_image, to_rgb
from .items import IMAGE_MARKER, has_markers
from .preprocess import Preprocessor
from .result import PackResult, Result, results_from_decisions
from .scoring import Decision, check_threshold, pack_decision
from .session import GraphSession
from .vote import Votes

__all__ = ["Classifier", "Item", "PackResult", "Result"]

# Items per forward. Padding makes a batch's memory grow with its longest item; past a few thousand items a batch
# only costs memory.
MAX_BATCH_SIZE = 4096


@dataclass(frozen=True)
class Item:
    text: str = ""
    images: tuple[Any, ...] = ()


def prompt_misfit(text: str, images: Sequence[Any], image_count: int) -> str | None:
    """Why an item (its text and images) cannot go through a bundle prompt that takes `image_count` images, or None.
    The one rule for the runtime's items and the export's held-out items (`savpack export --check-data`)."""
    if image_count and not images:
        return f"this bundle's prompt takes {image_count} image(s); the item has none"
    if not image_count and images:
        return f"this bundle's prompt is text-only; the item has {len(images)} image(s)"
    if not text and not images:
        return "has neither text nor images"
    if images and has_markers(text):
        # The builder would place the images at the markers; this prompt rule puts them first: refuse, not differ.
        return (f"{IMAGE_MARKER} markers placing images inside the text are a builder feature (savpack classify); "
                "the runtime's prompt puts the images before the text")
    return None


class Classifier:
    """A loaded bundle ready to classify. Build with `Classifier.load(folder)`."""

    def __init__(self, bundle: Bundle, session: GraphSession, preprocessor: Any, batch_size: int = 8):
        self.bundle = bundle
        self.session = session
        self.preprocessor = preprocessor
        self.batch_size = batch_size
        self.load_seconds: dict[str, float] = {}

    @classmethod
    def load(cls, folder: str | os.PathLike, providers: str | Sequence[str] = "cpu", threads: int | None = None,
             batch_size: int = 8, check_weights: bool = True) -> "Classifier":
        """Read and check the bundle, open its graph in onnxruntime, load its preprocessing.

        providers: "cpu", "cuda" or onnxruntime provider names (what really runs is in `.providers`).
        check_weights: hash the graph's weights file against bundle.json (a full read of the weights; see
        docs/export.md for its cost). False skips that hash only, for a bundle verified once and kept where nobody
        else writes; every other file is still checked.
        """
        _check_batch_size(batch_size)
        timings, started = {}, time.perf_counter()
        bundle = Bundle.load(folder, check_weights=False)
        timings["bundle"] = time.perf_counter() - started
        started = time.perf_counter()
        # The weights are hashed while onnxruntime builds the session (both mostly outside the GIL): the check costs
        # what the hash takes beyond the session's own load, and nothing classifies before it has passed.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="savpack-digest") as pool:
            digest = pool.submit(bundle.check_weights) if check_weights else None
            try:
                session = GraphSession(bundle.graph_path, providers, threads)
            except SavpackError:
                if digest is not None:
                    digest.result()  # altered weights explain a graph onnxruntime refuses: say so first
                raise
            if digest is not None:
                digest.result()
        timings["session"] = time.perf_counter() - started
        check_graph_metadata(bundle, session.metadata)
        if list(session.input_names) != list(bundle.graph["inputs"]):
            raise InputError(f"{bundle.graph_path}: graph inputs {list(session.input_names)} differ from bundle.json's {bundle.graph['inputs']}")
        for entry in bundle.packs:
            absent = [name for name in (entry.outputs or {}).values() if name not in session.output_names]
            if absent:
                raise GraphError(f"{bundle.graph_path}: pack {entry.name!r} reads graph outputs {absent}, which the graph "
                                 f"does not have ({list(session.output_names)})")
        started = time.perf_counter()
        preprocessor = Preprocessor.load(Path(folder))
        timings["preprocessor"] = time.perf_counter() - started
        classifier = cls(bundle, session, preprocessor, batch_size)
        classifier.load_seconds = timings
        return classifier

    @property
    def providers(self) -> list[str]:
        return self.session.providers

    @property
    def pack_names(self) -> list[str]:
        return [entry.name for entry in self.bundle.packs]

    @property
    def takes_images(self) -> bool:
        return self.bundle.graph["kind"] not in graph_inputs.TEXT_KINDS

    def classify(self, text: str = "", images: Sequence[Any] = (), abstain_below: float | None = None) -> Result:
        """One item: text and images (file paths or PIL images)."""
        return self.classify_batch([Item(text, tuple(images))], abstain_below=abstain_below)[0]

    def classify_batch(self, items: Iterable[Any], batch_size: int | None = None,
                       abstain_below: float | None = None) -> list[Result]:
        """Items as Item, {"text": ..., "images": [...]} dicts, (text, images) pairs or plain strings.
        abstain_below: a probability; items whose top probability is below it get label None, abstained True."""
        check_threshold(abstain_below)
        items = [self.check_item(item, index) for index, item in enumerate(items)]
        outputs = self.graph_outputs(items, batch_size)
        return results_from_decisions({entry.name: (entry.pack.labels, self.decision_from_outputs(entry, outputs, abstain_below))
                                       for entry in self.bundle.packs})

    @staticmethod
    def decision_from_outputs(entry: BundlePack, outputs: dict[str, np.ndarray], abstain_below: float | None = None) -> Decision:
        """A pack's decision over the batch from the graph's outputs: its cosines, vote and probabilities where the
        graph computes them (bundle format 2; bundles written before the probabilities moved into the graph leave
        those to numpy), else the reference numpy vote on the graph's head vectors (format 1)."""
        vectors = outputs[graph_inputs.OUTPUT_NAME][:, entry.positions]  # (B, k, D)
        if entry.outputs is None:
            return pack_decision(entry.pack, vectors, abstain_below=abstain_below)
        cosines, votes = outputs[entry.outputs["cosines"]], outputs[entry.outputs["votes"]]
        graph_votes = Votes(outputs[entry.outputs["prediction"]], votes, votes / entry.pack.k,
                            cosines.sum(axis=1, dtype=np.float64), cosines.argmax(axis=-1))
        probabilities = outputs[entry.outputs["probabilities"]] if "probabilities" in entry.outputs else None
        return pack_decision(entry.pack, vectors, abstain_below=abstain_below, similarities=cosines,
                             graph_votes=graph_votes, graph_probabilities=probabilities)

    def head_vectors(self, items: Iterable[Any], batch_size: int | None = None) -> np.ndarray:
        """(N, k, head_dim) for the graph's heads (bundle.json graph.heads), in the order of `items` (any form
        classify_batch takes)."""
        return self.graph_outputs(items, batch_size)[graph_inputs.OUTPUT_NAME]

    def graph_outputs(self, items: Iterable[Any], batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Every output of the graph by name (head vectors, each pack's in-graph vote), rows in the order of `items`
        (any form classify_batch takes)."""
        batch_size = self.batch_size if batch_size is None else _check_batch_size(batch_size)
        items = [self.check_item(item, index) for index, item in enumerate(items)]
        prompts = [self.preprocessor.render(item.text, len(item.images)) for item in items]
        batches = plan_batches([len(item.images) for item in items], self.preprocessor.token_counts(prompts), batch_size)
        outputs: dict[str, np.ndarray] = {}
        for batch in batches:
            images = [[_open(image, i) for image in items[i].images] for i in batch]
            encoded = self.preprocessor.encode([prompts[i] for i in batch], images)
            feed = graph_inputs.plan(self.bundle.graph["kind"], self.bundle.graph["plan"], encoded)
            for name, value in self.session.run_all(feed).items():
                if name not in outputs:
                    outputs[name] = np.zeros((len(items),) + value.shape[1:], dtype=value.dtype)
                outputs[name][batch] = value
        return outputs

    def check_item(self, item: Any, index: int = 0) -> Item:
        """One item in any accepted form, as an Item that fits this bundle's prompt; InputError("item {index}: ...")
        otherwise. Images are not opened here."""
        if isinstance(item, str):
            item = Item(item)
        elif isinstance(item, dict):
            unknown = sorted(set(item) - {"text", "images"})
            if unknown:
                raise InputError(f"item {index}: unknown field(s) {unknown}; expected 'text' and 'images'")
            item = Item(item.get("text") or "", tuple(item.get("images") or ()))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            item = Item(item[0] or "", tuple(item[1] or ()))
        elif not isinstance(item, Item):
            raise InputError(f"item {index}: expected text, a dict with 'text'/'images', or a (text, images) pair; got {type(item).__name__}")
        if not isinstance(item.text, str):
            raise InputError(f"item {index}: text must be a string, got {type(item.text).__name__}")
        problem = prompt_misfit(item.text, item.images, int(self.bundle.prompt["image_count"]))
        if problem:
            raise InputError(f"item {index}: {problem}")
        return item


def _check_batch_size(batch_size: Any) -> int:
    if not (type(batch_size) is int and 1 <= batch_size <= MAX_BATCH_SIZE):
        raise InputError(f"batch_size must be a whole number from 1 to {MAX_BATCH_SIZE}, got {batch_size!r}")
    return batch_size


def _open(image: Any, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike, ImageBytes)):
        return load_image(image)
    raise InputError(f"item {index}: an image must be a file path, ImageBytes or a PIL image, got {type(image).__name__}")
