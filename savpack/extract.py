"""One batched forward pass per example, stopping after the deepest needed layer, keeping each head's output at the
last real token (or, for encoders, at the first: [CLS]). Also the activations file that `savpack extract` writes and
`savpack build --activations` reads.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from savpack_runtime import files
from savpack_runtime.batching import plan_batches
from savpack_runtime.compat import BUILDER_PACKAGE, version_refusal
from savpack_runtime import format as fmt
from savpack_runtime import prompt as prompt_fields
from savpack_runtime.errors import PackError, SavpackError
from savpack_runtime.images import check_image
from savpack_runtime.items import Example

from .data import dataset_summary
from .errors import DataError
from .media import check_video, load_media
from .models import LoadedModel

ACTIVATIONS_FORMAT = "savpack-activations"
ACTIVATIONS_VERSION = 1
ACTIVATIONS_SUPPORTED_VERSIONS = (1,)


class _StopForward(Exception):
    """Raised inside the forward once every needed head is captured, so no later layer runs."""


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for left or right padding alike. (batch, seq) -> (batch,)"""
    return attention_mask.shape[1] - 1 - attention_mask.flip(1).to(torch.int64).argmax(dim=1)


def token_positions(attention_mask: torch.Tensor, which: str = fmt.DEFAULT_TOKEN_POSITION) -> torch.Tensor:
    """Index of each row's last ("last") or first ("first") real token. (batch, seq) -> (batch,)"""
    if which == "last":
        return last_positions(attention_mask)
    if which == "first":
        return attention_mask.to(torch.int64).argmax(dim=1)
    raise ValueError(f"token position {which!r} is not one of {fmt.TOKEN_POSITIONS}")


@dataclass
class Extraction:
    """Head outputs at the last token for N examples, with what is needed to check and reuse them."""

    vectors: np.ndarray  # (N, layers, heads, head_dim) for all heads, or (N, k, head_dim) for chosen heads
    input_ids: list[np.ndarray]  # per example, the exact token ids the model saw (padding removed)
    final_hidden: np.ndarray | None = None  # (N, hidden): the model's final (normed) state at the same token
    examples: list[Example] = field(default_factory=list)


def extract(
    loaded: LoadedModel,
    examples: Sequence[Example],
    template: str = fmt.TEXT_PLACEHOLDER,
    heads: np.ndarray | None = None,
    batch_size: int = 8,
    final_hidden: bool = False,
    progress: bool = True,
    video_frames: int = fmt.DEFAULT_VIDEO_FRAMES,
    token_position: str = fmt.DEFAULT_TOKEN_POSITION,
) -> Extraction:
    """Run the model once per example (batched) and return head vectors at the last (or first) real token.

    heads=None keeps every head of every layer; an int (k, 2) array of (layer, head) keeps only those, in that order,
    and stops the forward after the deepest of their layers. No LM head ever runs: the forward is the base model's.
    final_hidden=True runs all layers and the final norm too (for the hidden-state baselines), still in one pass.
    video_frames: frames sampled from each video, shown to the model as images.
    token_position: "last" real token, or "first" (an encoder's [CLS]); the family must offer it.
    """
    check_token_position(loaded, token_position)
    needed = list(range(loaded.grid[0])) if heads is None else sorted({int(layer) for layer in heads[:, 0]})
    check_media(examples)
    rendered = [_render(loaded, template, example, video_frames) for example in examples]
    image_counts = [example.image_count(video_frames) for example in examples]
    batches = plan_batches(image_counts, _token_counts(loaded, rendered), batch_size)
    collected = _Collected(len(examples), loaded.grid, heads, needed)
    stop_after = None if final_hidden else max(needed)
    # disable=None: tqdm draws only on a terminal, so logs and pipes get no bar fragments.
    with _HeadCapture(loaded, needed, stop_after) as capture, \
            tqdm(total=len(examples), desc="extracting", unit="ex", disable=None if progress else True, leave=False,
                 file=sys.stderr) as bar:
        for batch in batches:
            inputs = _encode(loaded, [examples[i] for i in batch], [rendered[i] for i in batch], video_frames)
            positions = token_positions(inputs["attention_mask"], token_position)
            output = capture.forward(inputs, positions)
            collected.add(batch, inputs, capture.per_layer(), output, positions)
            bar.update(len(batch))
    return collected.extraction(examples)


def check_media(examples: Sequence[Example]) -> None:
    """Every image and video opens (headers only): fail before the first forward, not minutes into extraction."""
    for path in sorted({path for example in examples for path in example.images}, key=str):
        check_image(path)
    for path in sorted({path for example in examples for path in example.videos}):
        check_video(path)


def _encode(loaded: LoadedModel, batch: list[Example], rendered: list[str], video_frames: int) -> dict[str, torch.Tensor]:
    """One batch's model inputs: its pictures loaded (videos sampled to frames), its prompts encoded, lengths checked."""
    pictures = [load_media(example, video_frames) for example in batch]
    inputs = _processed(loaded, batch, rendered, pictures)
    _check_lengths(loaded, batch, inputs["attention_mask"])
    return inputs


def _processed(loaded: LoadedModel, batch: list[Example], rendered: list[str], pictures: list[list[Any]]) -> dict[str, torch.Tensor]:
    """loaded.encode, with the processor's own refusals (an image of extreme aspect ratio, too small to patch, ...) as
    a DataError naming the item: on failure each item is encoded alone to find it."""
    try:
        return loaded.encode(rendered, pictures)
    except SavpackError:
        raise
    except Exception as batch_error:  # transformers' processors raise ValueError, TypeError, RuntimeError, ...
        for example, prompt, images in zip(batch, rendered, pictures):
            try:
                loaded.encode([prompt], [images])
            except SavpackError:
                raise
            except Exception as exc:
                sizes = ", ".join(f"{width}x{height}" for width, height in (image.size for image in images))
                raise DataError(f"{example.source}: the {loaded.family.name} processor refuses this item"
                                f"{f' (image size {sizes})' if sizes else ''}: {_first_line(exc)}") from exc
        raise DataError(f"the {loaded.family.name} processor refuses a batch of {len(batch)} items "
                        f"({batch[0].source}, ...): {_first_line(batch_error)}") from batch_error


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _HeadCapture:
    """Forward pre-hooks on the attention output projections of the `needed` layers: each keeps its input (every
    head's output) at one token per row; the hook of layer `stop_after` ends the forward there (None: run it all)."""

    def __init__(self, loaded: LoadedModel, needed: list[int], stop_after: int | None):
        self.loaded, self.needed, self.stop_after = loaded, needed, stop_after
        self.captured: dict[int, torch.Tensor] = {}
        self.positions: torch.Tensor | None = None
        self.handles: list[Any] = []

    def __enter__(self) -> "_HeadCapture":
        modules = self.loaded.attention_outputs
        self.handles = [modules[layer].register_forward_pre_hook(self._hook(layer)) for layer in self.needed]
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, layer: int):
        _, num_heads, head_dim = self.loaded.grid

        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            per_token = args[0]  # (batch, seq, heads * head_dim): the attention output before its projection
            rows = torch.arange(per_token.shape[0], device=per_token.device)
            self.captured[layer] = per_token[rows, self.positions].float().reshape(-1, num_heads, head_dim).cpu()
            if layer == self.stop_after:
                raise _StopForward
        return hook

    def forward(self, inputs: dict[str, torch.Tensor], positions: torch.Tensor) -> Any:
        """The base model's forward (no LM head) on one batch; its output, or None when a hook stopped it."""
        self.positions = positions
        self.captured.clear()
        with torch.inference_mode():
            try:
                return self.loaded.model.base_model(**inputs, use_cache=False)
            except _StopForward:
                return None

    def per_layer(self) -> np.ndarray:
        """(batch, len(needed), heads, head_dim): what the last forward captured, layer by layer."""
        return torch.stack([self.captured[layer] for layer in self.needed], dim=1).numpy()


class _Collected:
    """The extraction's arrays, filled batch by batch in the examples' order."""

    def __init__(self, count: int, grid: tuple[int, int, int], heads: np.ndarray | None, needed: list[int]):
        layers, num_heads, head_dim = grid
        self.heads = heads
        self.vectors = np.zeros((count, layers, num_heads, head_dim) if heads is None else (count, len(heads), head_dim),
                                dtype=np.float32)
        if heads is not None:
            position = {layer: i for i, layer in enumerate(needed)}
            self.chosen_layers = [position[int(layer)] for layer in heads[:, 0]]  # index into the needed layers
        self.input_ids: list[np.ndarray] = [np.zeros(0, np.int64)] * count
        self.hidden: np.ndarray | None = None

    def add(self, batch: list[int], inputs: dict[str, torch.Tensor], per_layer: np.ndarray, output: Any,
            positions: torch.Tensor) -> None:
        mask = inputs["attention_mask"]
        for row, index in enumerate(batch):
            self.input_ids[index] = inputs["input_ids"][row][mask[row].bool()].cpu().numpy().astype(np.int64)
        self.vectors[batch] = per_layer if self.heads is None else per_layer[:, self.chosen_layers, self.heads[:, 1]]
        if output is not None:  # the forward ran to the end: the final (normed) hidden state at the same token
            state_at = output.last_hidden_state[torch.arange(len(batch)), positions].float().cpu().numpy()
            if self.hidden is None:
                self.hidden = np.zeros((len(self.input_ids), state_at.shape[1]), dtype=np.float32)
            self.hidden[batch] = state_at

    def extraction(self, examples: Sequence[Example]) -> Extraction:
        return Extraction(self.vectors, self.input_ids, self.hidden, list(examples))


def _render(loaded: LoadedModel, template: str, example: Example, video_frames: int) -> str:
    try:
        return loaded.render(template, example.prompt_text(video_frames), example.image_count(video_frames))
    except DataError as exc:
        raise DataError(f"{example.source}: {exc}") from None


def check_token_position(loaded: LoadedModel, token_position: str) -> None:
    if token_position not in loaded.family.token_positions:
        raise DataError(
            f"token position {token_position!r} is not offered by the {loaded.family.name} family of {loaded.model_id} "
            f"(it offers {list(loaded.family.token_positions)})"
        )


def _token_counts(loaded: LoadedModel, rendered: list[str]) -> list[int]:
    """Text tokens of each rendered prompt (image placeholders not expanded): the key that batches similar lengths."""
    return [len(ids) for ids in loaded.tokenizer(rendered, add_special_tokens=False)["input_ids"]]


def _check_lengths(loaded: LoadedModel, batch: list[Example], mask: torch.Tensor) -> None:
    if loaded.max_positions is None:
        return
    lengths = mask.sum(dim=1).tolist()
    for example, length in zip(batch, lengths):
        if length > loaded.max_positions:
            raise DataError(
                f"{example.source}: prompt is {length} tokens, longer than the model's context of "
                f"{loaded.max_positions}; shorten the text or the prompt"
            )


# -- the activations file -----------------------------------------------------------------------------------------


@dataclass
class ActivationSet:
    """What `savpack extract` writes: every head's vector for N labelled examples, reusable by `build`."""

    activations: np.ndarray  # (N, layers, heads, head_dim) float32
    labels: list[str]  # per example
    input_ids: list[np.ndarray]
    model: dict[str, Any]  # as in a pack: id, revision, family, grid, fingerprint
    prompt: dict[str, Any]  # as in a pack
    digests: list[str]  # per example, Example.digest()
    sources: list[str]  # per example, "file:line"
    final_hidden: np.ndarray | None = None  # (N, hidden)

    @property
    def dataset(self) -> dict[str, Any]:
        return dataset_summary(self.digests, self.labels)

    @property
    def token_position(self) -> str:
        """Which token's head outputs these are, read as a pack reads it (absent means the last token)."""
        return prompt_fields.token_position(self.prompt)

    def subset(self, indices: Sequence[int]) -> "ActivationSet":
        rows = list(indices)
        pick = lambda values: [values[i] for i in rows]  # noqa: E731
        return replace(self, activations=self.activations[rows], labels=pick(self.labels), input_ids=pick(self.input_ids),
                       digests=pick(self.digests), sources=pick(self.sources),
                       final_hidden=None if self.final_hidden is None else self.final_hidden[rows])

    @classmethod
    def concatenate(cls, parts: Sequence["ActivationSet"]) -> "ActivationSet":
        """One set from parts extracted separately (e.g. in chunks) with the same model and prompt."""
        first = parts[0]
        for part in parts[1:]:
            if part.model != first.model or part.prompt != first.prompt:
                raise DataError("activation sets from different models or prompts cannot be joined")
            if (part.final_hidden is None) != (first.final_hidden is None):
                raise DataError("activation sets with and without final hidden states cannot be joined")
        join = lambda name: [item for part in parts for item in getattr(part, name)]  # noqa: E731
        return cls(np.concatenate([part.activations for part in parts]), join("labels"), join("input_ids"),
                   first.model, first.prompt, join("digests"), join("sources"),
                   None if first.final_hidden is None else np.concatenate([part.final_hidden for part in parts]))

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        return files.write(path, *self._tensors_and_metadata(), force)

    def to_bytes(self) -> bytes:
        """The bytes `save` writes (a shard that `savpack extract --engine ray` sends to the driver)."""
        return files.dumps(*self._tensors_and_metadata())

    def _tensors_and_metadata(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        offsets = np.cumsum([0] + [len(ids) for ids in self.input_ids]).astype(np.int64)
        tensors = {
            "activations": self.activations.astype(np.float32, copy=False),
            "input_ids": np.concatenate(self.input_ids).astype(np.int64) if self.input_ids else np.zeros(0, np.int64),
            "input_offsets": offsets,
        }
        if self.final_hidden is not None:
            tensors["final_hidden"] = self.final_hidden.astype(np.float32, copy=False)
        metadata = {
            "savpack.activations_format": ACTIVATIONS_FORMAT,
            "savpack.activations_version": str(ACTIVATIONS_VERSION),
            "savpack.example_labels": json.dumps(self.labels, ensure_ascii=False),
            "savpack.example_sources": json.dumps(self.sources, ensure_ascii=False),
            "savpack.example_digests": json.dumps(self.digests),
            fmt.META_MODEL: json.dumps(self.model, sort_keys=True),
            fmt.META_PROMPT: json.dumps(self.prompt, sort_keys=True, ensure_ascii=False),
        }
        return tensors, metadata

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ActivationSet":
        """An activations file, or a folder of shards (`savpack extract --engine ray`) joined in file-name order."""
        if Path(path).is_dir():
            shards = sorted(Path(path).glob("*.safetensors"))
            if not shards:
                raise DataError(f"{path}: folder holds no activation shards (*.safetensors)")
            return cls.concatenate([cls.load(shard) for shard in shards])
        try:
            tensors, metadata = files.read(path, max_bytes=None)
        except PackError as exc:
            raise DataError(f"activations file {exc}") from None
        if metadata.get("savpack.activations_format") != ACTIVATIONS_FORMAT:
            raise DataError(f"{path}: not a savpack activations file (written by `savpack extract`)")
        version = metadata.get("savpack.activations_version", "")
        if not (version.isascii() and version.isdigit()) or len(version) > 9:
            raise DataError(f"{path}: activations format version is {version!r}, expected a decimal integer")
        refusal = version_refusal(int(version), ACTIVATIONS_SUPPORTED_VERSIONS, "activations format version", BUILDER_PACKAGE)
        if refusal:
            raise DataError(f"{path}: {refusal}")
        try:
            labels = json.loads(metadata["savpack.example_labels"])
            sources = json.loads(metadata["savpack.example_sources"])
            digests = json.loads(metadata["savpack.example_digests"])
            model = json.loads(metadata[fmt.META_MODEL])
            prompt = json.loads(metadata[fmt.META_PROMPT])
            activations, ids, offsets = tensors["activations"], tensors["input_ids"], tensors["input_offsets"]
        except (KeyError, ValueError) as exc:
            raise DataError(f"{path}: activations file lacks or garbles {exc}") from None
        count = activations.shape[0] if activations.ndim == 4 else -1
        if count < 0 or not len(labels) == len(sources) == len(digests) == count or offsets.shape != (count + 1,):
            raise DataError(f"{path}: activations, labels, sources, digests and input offsets disagree in length")
        if list(activations.shape[1:]) != list(model.get("grid", [])):
            raise DataError(f"{path}: activations shape {list(activations.shape)} disagrees with the model grid {model.get('grid')}")
        if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != len(ids):
            raise DataError(f"{path}: input_offsets do not partition input_ids")
        input_ids = [np.asarray(ids[offsets[i] : offsets[i + 1]]) for i in range(count)]
        return cls(np.asarray(activations), labels, input_ids, model, prompt, digests, sources, tensors.get("final_hidden"))
