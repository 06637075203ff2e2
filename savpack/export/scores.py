"""The classifier inside the graph: each pack's vote and probabilities computed by the graph itself, after the head
vectors.

For pack i of a bundle the graph returns, besides `head_vectors`:
    pack{i}.cosines        (B, k, C) float32  cosine of each of the pack's head vectors to each class centroid
    pack{i}.votes          (B, C) int64       heads voting for each class (each head votes for its nearest centroid)
    pack{i}.prediction     (B,) int64         the pack's label: its vote (majority: most votes, ties to the larger
                                              summed cosine, then to the lower class index; cosine: the larger summed
                                              cosine; weighted: most head score, ties as majority), or for probe packs
                                              and the "probability" vote the argmax of the probabilities below
    pack{i}.probabilities  (B, C) float32     the pack's scoring model (docs/format.md section 5): vote packs the
                                              sharpened mean of the heads' softmax(cos / temperature), probe packs
                                              softmax((unit vectors @ W^T + b) / temperature); format-1 packs (no
                                              scoring model) the vote shares, votes / k
so a client in any language that runs ONNX gets labels and probabilities without reimplementing anything. The rules
are the runtime's numpy ones (savpack_runtime.vote and savpack_runtime.scoring, the references that tests compare
against); centroids enter as constants, already scaled to unit length by the runtime's own `unit`.

Precision: cosines are float32, as numpy's. The probabilities are computed in float64 from the float32 cosines (or
head vectors), as numpy computes them, and returned as float32; a probability label is the argmax of the float64
values, as numpy's (two classes whose probabilities agree to float32 rounding may both show the label's value). Vote
sums are float32 here and float64 in numpy: the two can pick differently only when two classes tie on votes and their
summed cosines agree to float32 rounding.

Shapes: B batch, K graph heads, k a pack's heads, C classes, d head_dim.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from savpack_runtime import graph_inputs
from savpack_runtime.pack import Pack
from savpack_runtime.scoring import DECISION_METHODS, PROBABILITY_FLOOR, PROBABILITY_VOTE
from savpack_runtime.vote import NORM_FLOOR, unit

from ..errors import ExportError

# Node and initializer names of the scoring part start with this (torch names them after the module path), so the
# float16 and int8 conversions can leave it in float32: the vote must stay the reference's.
SCORES_MODULE = "scores"


class PackScores(nn.Module):
    """One pack's cosines, votes, prediction and probabilities from the graph's head vectors."""

    def __init__(self, pack: Pack, positions: np.ndarray):
        super().__init__()
        method = pack.selection.get("vote", "majority")
        scoring = pack.scoring_model
        if method not in DECISION_METHODS:
            raise ExportError(f"pack {pack.name or ''!r}: vote method {method!r} is not one of {list(DECISION_METHODS)}")
        if method == PROBABILITY_VOTE and scoring is None:
            raise ExportError(f"pack {pack.name or ''!r}: vote method 'probability' needs a calibrated pack (format 2)")
        self.method = method
        # What the probabilities are: "shares" (format 1: no scoring model), "heads" (vote packs) or "probe".
        self.model = "shares" if scoring is None else ("probe" if scoring.classifier == "probe" else "heads")
        self.label_by_probability = self.model == "probe" or method == PROBABILITY_VOTE
        self.temperature = scoring.temperature if scoring else 1.0
        self.sharpness = scoring.sharpness if scoring else 1.0
        self.k = len(pack.heads)
        self.register_buffer("positions", torch.from_numpy(np.asarray(positions, dtype=np.int64)), persistent=False)
        # (k, d, C): unit centroids, laid out for one batched matmul per head.
        self.register_buffer("centroids", torch.from_numpy(np.ascontiguousarray(unit(pack.centroids).transpose(0, 2, 1))),
                             persistent=False)
        self.register_buffer("classes", torch.arange(len(pack.labels)), persistent=False)
        # (k,) float64: the "weighted" vote's head weights, as numpy widens the pack's float32 head scores.
        self.register_buffer("head_weights", torch.from_numpy(np.asarray(pack.head_scores, dtype=np.float64)), persistent=False)
        if self.model == "probe":
            # (k * d, C) and (C,), float64 as numpy's probe_logits computes.
            self.register_buffer("probe_weight", torch.from_numpy(np.ascontiguousarray(
                np.asarray(scoring.probe_weight, dtype=np.float64).T)), persistent=False)
            self.register_buffer("probe_bias", torch.from_numpy(np.asarray(scoring.probe_bias, dtype=np.float64)),
                                 persistent=False)

    def forward(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen = vectors[:, self.positions]  # (B, k, d)
        units = chosen / chosen.norm(dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
        cosines = torch.matmul(units.transpose(0, 1), self.centroids).transpose(0, 1)  # (B, k, C)
        choices = cosines.argmax(dim=-1)  # (B, k)
        chose = choices[..., None] == self.classes  # (B, k, C)
        votes = chose.to(torch.int64).sum(dim=1)  # (B, C)
        probabilities = self.probabilities(chosen, cosines, votes)  # (B, C) float64
        if self.label_by_probability:
            prediction = probabilities.argmax(dim=1)  # in float64, as numpy decides; ties to the lower index
        else:
            prediction = self.vote_winner(cosines, chose, votes)
        return cosines, votes, prediction, probabilities.to(torch.float32)

    def vote_winner(self, cosines: torch.Tensor, chose: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
        """savpack_runtime.vote.vote's winner for the pack's method: (B,)."""
        sums = cosines.sum(dim=1)  # (B, C)
        if self.method == "cosine":
            return sums.argmax(dim=1)
        if self.method == "weighted":
            # Head by head in vote order, in float64, as numpy adds them: equal tallies tie here exactly when there.
            tally = chose[:, 0].to(torch.float64) * self.head_weights[0]
            for head in range(1, self.k):
                tally = tally + chose[:, head].to(torch.float64) * self.head_weights[head]
        else:
            tally = votes
        tied = tally == tally.max(dim=1, keepdim=True).values
        return torch.where(tied, sums, torch.finfo(sums.dtype).min).argmax(dim=1)

    def probabilities(self, vectors: torch.Tensor, cosines: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
        """savpack_runtime.scoring.probabilities, in float64, for the pack's head vectors (B, k, d): (B, C)."""
        if self.model == "shares":
            return votes.to(torch.float64) / self.k
        if self.model == "probe":
            chosen = vectors.to(torch.float64)  # (B, k, d): unit length in float64, as scoring.probe_features
            units = chosen / chosen.norm(dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
            logits = torch.matmul(units.flatten(1), self.probe_weight) + self.probe_bias  # (B, C)
            return torch.softmax(logits / self.temperature, dim=-1)
        per_head = torch.softmax(cosines.to(torch.float64) / self.temperature, dim=-1)  # (B, k, C)
        mean = per_head.mean(dim=1)  # (B, C)
        return torch.softmax(self.sharpness * torch.log(mean.clamp(min=PROBABILITY_FLOOR)), dim=-1)


class ScoredGraph(nn.Module):
    """A graph module followed by every pack's scores: outputs head_vectors, then each pack's SCORE_ROLES."""

    def __init__(self, graph: nn.Module, packs: Sequence[Pack], positions: Sequence[np.ndarray]):
        super().__init__()
        # Not "graph": torch.export turns modules into torch.fx GraphModules, whose `graph` attribute is the FX graph.
        self.heads = graph
        self.scores = nn.ModuleList(PackScores(pack, position) for pack, position in zip(packs, positions))  # SCORES_MODULE

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vectors = self.heads(*inputs)
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
