"""How items are grouped into forward passes, one rule for the builder's extraction and the runtime's Classifier.

A batch holds items with one number of images (processors pair nested image lists with prompts), and within that
group items of similar token counts go together: a forward's cost is linear in padded tokens, and character counts
order them badly. Results do not depend on the grouping (tests compare batched with one item at a time).
"""

from __future__ import annotations

import itertools
from typing import Sequence


def plan_batches(image_counts: Sequence[int], token_counts: Sequence[int], batch_size: int) -> list[list[int]]:
    """Item indices in batches of at most `batch_size`: one image count per batch, ordered by (images, tokens)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(image_counts)), key=lambda i: (image_counts[i], token_counts[i]))
    groups = [list(group) for _, group in itertools.groupby(order, key=lambda i: image_counts[i])]
    return [group[start : start + batch_size] for group in groups for start in range(0, len(group), batch_size)]
