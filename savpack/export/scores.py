"""The classifier inside the graph: each pack's vote computed by the graph itself, after the head vectors.

For pack i of a bundle the graph returns, besides `head_vectors`:
    pack{i}.cosines     (B, k, C) float32  cosine of each of the pack's head vectors to each class centroid
    pack{i}.votes       (B, C) int64       heads voting for each class (each head votes for its nearest centroid)
    pack{i}.prediction  (B,) int64         the winning class: most votes, ties to the larger summed cosine, then to
                                           the lower class index ("cosine" packs: the larger summed cosine outright)
so a client in any language that runs ONNX gets labels without reimplementing the vote. The rule is the runtime's
numpy vote (savpack_runtime.vote, the reference that tests compare against); centroids enter as constants, already
scaled to unit length by the runtime's own `unit`. Sums are float32 here and float64 in numpy: the two can pick
differently only when two classes tie on votes and their summed cosines agree to float32 rounding.

Calibrated class probabilities (`pack{i}.probabilities`, issue 14) slot in beside the votes as one more output of
PackScores when a pack carries a calibration model.

Shapes: B batch, K graph heads, k a pack's heads, C classes, d head_dim.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from savpack_runtime import graph_inputs
from savpack_runtime.pack import Pack
from savpack_runtime.vote import NORM_FLOOR, unit

# Node and initializer names of the scoring part start with this (torch names them after the module path), so the
# float16 and int8 conversions can leave it in float32: the vote must stay the reference's.
SCORES_MODULE = "scores"


class PackScores(nn.Module):
    """One pack's cosines, votes and prediction from the graph's head vectors."""

    def __init__(self, pack: Pack, positions: np.ndarray):
        super().__init__()
        method = pack.selection.get("vote", "majority")
        if method not in ("majority", "cosine"):
            raise ValueError(f"pack vote {method!r} is not 'majority' or 'cosine'")
        self.majority = method == "majority"
        self.register_buffer("positions", torch.from_numpy(np.asarray(positions, dtype=np.int64)), persistent=False)
        # (k, d, C): unit centroids, laid out for one batched matmul per head.
        self.register_buffer("centroids", torch.from_numpy(np.ascontiguousarray(unit(pack.centroids).transpose(0, 2, 1))),
                             persistent=False)
        self.register_buffer("classes", torch.arange(len(pack.labels)), persistent=False)

    def forward(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen = vectors[:, self.positions]  # (B, k, d)
        chosen = chosen / chosen.norm(dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
        cosines = torch.matmul(chosen.transpose(0, 1), self.centroids).transpose(0, 1)  # (B, k, C)
        choices = cosines.argmax(dim=-1)  # (B, k)
        votes = (choices[..., None] == self.classes).to(torch.int64).sum(dim=1)  # (B, C)
        sums = cosines.sum(dim=1)  # (B, C)
        if self.majority:
            tied = votes == votes.max(dim=1, keepdim=True).values
            sums = torch.where(tied, sums, torch.finfo(sums.dtype).min)
        return cosines, votes, sums.argmax(dim=1)


class ScoredGraph(nn.Module):
    """A graph module followed by every pack's scores: outputs head_vectors, then each pack's SCORE_ROLES."""

    def __init__(self, graph: nn.Module, packs: Sequence[Pack], positions: Sequence[np.ndarray]):
        super().__init__()
        self.graph = graph
        self.scores = nn.ModuleList(PackScores(pack, position) for pack, position in zip(packs, positions))  # SCORES_MODULE

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vectors = self.graph(*inputs)
        outputs = [vectors]
        for pack in self.scores:
            outputs += pack(vectors)
        return tuple(outputs)


def output_names(pack_count: int) -> list[str]:
    """Every output of a scored graph, in order."""
    names = [graph_inputs.OUTPUT_NAME]
    for index in range(pack_count):
        names += list(graph_inputs.score_outputs(index).values())
    return names
