"""Labelled datasets for building: few-shot sampling and the dataset summary a pack records.

Reading data files and folders is the runtime's (savpack_runtime.items: one reader for the builder and the runtime);
its names are re-exported here because the builder's API has always offered them from this module.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from typing import Sequence

from savpack_runtime.items import IMAGE_MARKER, VIDEO_MARKER, Example, load_examples

from .errors import DataError

__all__ = ["DIGEST_CHARS", "Example", "IMAGE_MARKER", "VIDEO_MARKER", "dataset_summary", "labels_of", "load_examples",
           "sample_shots"]

DIGEST_CHARS = 16  # of each example's sha256 kept in a pack


def labels_of(examples: list[Example]) -> list[str]:
    """The classes, sorted: class index i is labels[i] everywhere in savpack."""
    return sorted({example.label for example in examples if example.label is not None})


def sample_shots(labels: Sequence[str], shots: int, seed: int, fewer_ok: bool = False) -> tuple[list[int], list[int]]:
    """Draw `shots` indices per class (seeded); returns (sampled, the rest), each in ascending order.

    fewer_ok: a class with fewer than `shots` examples gives all it has (many-class sets such as trec's fine labels)
    instead of an error."""
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    if shots < 1:
        raise DataError(f"--shots must be >= 1, got {shots}")
    rng = random.Random(seed)
    chosen: set[int] = set()
    for label in sorted(by_label):
        indices = by_label[label]
        if shots > len(indices) and not fewer_ok:
            raise DataError(f"--shots {shots} is more than class {label!r} has ({len(indices)} examples)")
        chosen.update(rng.sample(indices, min(shots, len(indices))))
    return sorted(chosen), [index for index in range(len(labels)) if index not in chosen]


def dataset_summary(digests: Sequence[str], labels: Sequence[str]) -> dict[str, object]:
    """What a pack records of its data: sha256 over the examples' digests in order, the count, per-class counts,
    and a prefix of each example's digest (so evaluation can recognise and skip training examples)."""
    hasher = hashlib.sha256()
    for digest in digests:
        hasher.update(digest.encode())
    return {"sha256": hasher.hexdigest(), "examples": len(digests), "class_counts": dict(sorted(Counter(labels).items())),
            "example_digests": sorted(digest[:DIGEST_CHARS] for digest in digests)}
