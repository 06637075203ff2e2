"""The original Sparse Attention Vectors procedure, re-implemented as published, as the baseline savpack is measured against.

Followed (read, not copied): chancharikmitra/SAVs
  - src/utils.py @ 6304129b098750e8c2b99dae2bfbad57763da118: mllm_encode, get_class_activations,
    get_last_mean_head_activations, gather_last_attn_activations (baukit TraceDict with retain_input=True,
    retain_output=True), split_activations_by_head, get_query_activations, record_head_performance,
    retrieve_examples, mllm_classify;
  - src/model.py @ baa7b40cee89031440a38f54f8fb99c9673fc259: the model helpers, whose forward is the full model
    (`self.model(**inputs)`: every layer, the final norm and the LM head over the whole vocabulary at every position).

What it does, as the original does:
  - every forward is the full model at batch size 1, with default arguments (all-position, full-vocabulary logits);
    hooks on every layer's attention output projection keep its input and output at every position until the forward
    returns; the head vectors are the input split per head, at the last position;
  - build = three passes over the labelled set, one forward per example each: (1) class means of every head, (2) each
    head scores +1 per example whose cosine-nearest class mean (pass 1) is its own class, computed head by head,
    (3) class means of the top k heads, from fresh forwards;
  - classify = one full forward per item; each top head votes for its cosine-nearest class mean; most votes wins.

Where the original is model-specific or leaves the outcome undefined, this re-implementation aligns with savpack so the
two can be compared item for item (the benchmark and tests/test_reference_sav.py assert equal heads and predictions):
  - inputs: savpack's LoadedModel.render + encode for one item (same prompt, chat template and image preprocessing);
    the original builds prompts with its own helpers per model;
  - hooks: on the modules savpack finds (find_attention_outputs) rather than the hard-coded
    `model.layers.{i}.self_attn.o_proj` paths; head grid from the model config instead of the hard-coded 28 x 28, and
    head_dim from the config (the original splits by hidden_size // heads, which is wrong for Gemma 3: 640 // 4 != 256);
  - label indices: sorted labels (the original numbers labels in order of first appearance); this changes nothing
    but which class wins an exact cosine tie;
  - top-k ties: higher score first, then lower layer, then lower head (the original's np.argsort(...)[-k:][::-1] is an
    unstable quicksort, so its order among equal scores is arbitrary);
  - vote ties: Counter.most_common keeps tied classes in the order the heads first voted for them; here a tie goes to
    the larger cosine summed over the heads, then the lower class index, as savpack's majority vote does (ties are
    counted and reported);
  - class sums are accumulated in float64 and the means kept in float32, as savpack does (the original adds in the
    activation dtype; in float32 that changes means by rounding only, but could flip a near-tied cosine argmax).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from savpack.data import Example
from savpack.media import load_media
from savpack_runtime.format import DEFAULT_VIDEO_FRAMES
from savpack.models import LoadedModel


class TraceAttentionOutputs:
    """Keeps the input and output (all positions) of every attention output projection during a forward, like baukit's
    TraceDict(retain_input=True, retain_output=True): the tensors are held, not copied, until the trace is left."""

    def __init__(self, modules: Sequence[torch.nn.Module]):
        self.modules = list(modules)
        self.inputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles: list[Any] = []

    def __enter__(self) -> "TraceAttentionOutputs":
        for index, module in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(self._retain(index)))
        return self

    def _retain(self, index: int):
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            self.inputs[index] = args[0]  # (1, seq, heads * head_dim)
            self.outputs[index] = output  # (1, seq, hidden)
        return hook

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def last_token_heads(loaded: LoadedModel, example: Example, template: str) -> torch.Tensor:
    """One full forward of one item; every head's output at the last position: (layers, heads, head_dim).
    The item is rendered and preprocessed as savpack's extraction does (videos as DEFAULT_VIDEO_FRAMES frames)."""
    layers, heads, head_dim = loaded.grid
    frames = DEFAULT_VIDEO_FRAMES
    prompt = loaded.render(template, example.prompt_text(frames), example.image_count(frames))
    inputs = loaded.encode([prompt], [load_media(example, frames)])
    with torch.inference_mode():
        with TraceAttentionOutputs(loaded.attention_outputs) as trace:
            result = loaded.model(**inputs)  # noqa: F841  (kept alive like the original's `result`)
        # (layers, seq, heads, head_dim) -> (layers, heads, seq, head_dim), then the last position.
        per_head = torch.vstack([value.reshape(value.shape[:-1] + (heads, head_dim)) for value in trace.inputs])
        return per_head.permute(0, 2, 1, 3)[:, :, -1, :].float()


def class_means(loaded: LoadedModel, examples: Sequence[Example], template: str, heads: np.ndarray,
                labels: Sequence[str]) -> torch.Tensor:
    """One pass over the labelled examples: the class mean of each listed head, (C, len(heads), head_dim) float32."""
    index = {label: i for i, label in enumerate(labels)}
    sums: torch.Tensor | None = None
    counts = torch.zeros(len(labels), dtype=torch.float64)
    rows, columns = torch.as_tensor(heads[:, 0]), torch.as_tensor(heads[:, 1])
    for example in examples:
        chosen = last_token_heads(loaded, example, template)[rows, columns].double()  # (k, head_dim)
        if sums is None:
            sums = torch.zeros((len(labels),) + tuple(chosen.shape), dtype=torch.float64, device=chosen.device)
        sums[index[example.label]] += chosen
        counts[index[example.label]] += 1
    return (sums / counts.to(sums.device)[:, None, None]).float()


def record_head_performance(means: torch.Tensor, current: torch.Tensor, label: int, success: list[int]) -> None:
    """Head by head, as the original: +1 for each head whose cosine-nearest class mean is the example's own class.
    means (C, M, D), current (M, D)."""
    for head in range(means.shape[1]):
        scores = torch.nn.functional.cosine_similarity(means[:, head, :], current[head, :], dim=-1)
        if scores.argmax(dim=0).item() == label:
            success[head] += 1


def score_heads_loop(vectors: torch.Tensor, label_index: Sequence[int], classes: int) -> np.ndarray:
    """The original's scoring step on vectors already extracted: class means by accumulation, then the per-example,
    per-head loop. vectors (N, M, D) -> (M,) number of examples each head classifies correctly."""
    sums = torch.zeros((classes,) + tuple(vectors.shape[1:]), dtype=torch.float64)
    counts = torch.zeros(classes, dtype=torch.float64)
    for row, label in enumerate(label_index):
        sums[label] += vectors[row].double()
        counts[label] += 1
    means = (sums / counts[:, None, None]).float()
    success = [0] * vectors.shape[1]
    for row, label in enumerate(label_index):
        record_head_performance(means, vectors[row], int(label), success)
    return np.array(success, dtype=np.int64)


def top_heads_by_score(success: np.ndarray, grid_heads: int, k: int) -> np.ndarray:
    """(layers * heads,) counts -> (k, 2) int32 (layer, head): higher score, then lower layer, then lower head."""
    ranked = sorted(range(len(success)), key=lambda flat: (-int(success[flat]), flat))[:k]
    return np.array([(flat // grid_heads, flat % grid_heads) for flat in ranked], dtype=np.int32).reshape(-1, 2)


@dataclass
class ReferenceModel:
    labels: list[str]
    heads: np.ndarray  # (k, 2) int32 (layer, head)
    centroids: np.ndarray  # (k, C, head_dim) float32
    head_correct: np.ndarray  # (layers, heads) examples each head classified correctly in pass 2
    template: str
    vote_ties: int = 0  # classifications whose majority was tied (resolved like savpack)
    extras: dict[str, Any] = field(default_factory=dict)


def encode(loaded: LoadedModel, examples: Sequence[Example], template: str, k: int = 20) -> ReferenceModel:
    """Build: three passes over the labelled examples, one full forward per example each (mllm_encode)."""
    if any(example.label is None for example in examples):
        raise ValueError("every labelled example needs a label")
    labels = sorted({example.label for example in examples})
    layers, grid_heads, _ = loaded.grid
    all_heads = np.array([(layer, head) for layer in range(layers) for head in range(grid_heads)], dtype=np.int32)
    means = class_means(loaded, examples, template, all_heads, labels)  # pass 1: (C, M, D)
    success = [0] * len(all_heads)
    for example in examples:  # pass 2
        current = last_token_heads(loaded, example, template)[all_heads[:, 0], all_heads[:, 1]]  # (M, D)
        record_head_performance(means, current, labels.index(example.label), success)
    heads = top_heads_by_score(np.array(success), grid_heads, k)
    top_means = class_means(loaded, examples, template, heads, labels)  # pass 3: (C, k, D)
    return ReferenceModel(labels=labels, heads=heads, centroids=top_means.permute(1, 0, 2).contiguous().cpu().numpy(),
                          head_correct=np.array(success, dtype=np.int64).reshape(layers, grid_heads), template=template)


def classify(loaded: LoadedModel, model: ReferenceModel, examples: Sequence[Example]) -> list[str]:
    """One full forward per item; each top head votes for its cosine-nearest class mean (mllm_classify)."""
    centroids = torch.as_tensor(model.centroids)  # (k, C, D)
    rows, columns = torch.as_tensor(model.heads[:, 0]), torch.as_tensor(model.heads[:, 1])
    predictions = []
    for example in examples:
        current = last_token_heads(loaded, example, model.template)[rows, columns].cpu()  # (k, D)
        choices, cosine_sums = [], torch.zeros(len(model.labels), dtype=torch.float64)
        for head in range(len(model.heads)):
            scores = torch.nn.functional.cosine_similarity(centroids[head], current[head], dim=-1)  # (C,)
            choices.append(int(scores.argmax().item()))
            cosine_sums += scores.double()
        ranked = Counter(choices).most_common()
        tied = [label for label, votes in ranked if votes == ranked[0][1]]
        if len(tied) > 1:
            model.vote_ties += 1
            winner = max(tied, key=lambda label: (float(cosine_sums[label]), -label))
        else:
            winner = ranked[0][0]
        predictions.append(model.labels[winner])
    return predictions

