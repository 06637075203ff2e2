"""The export-friendly decoder: layers 0..L* of a Hugging Face language model, reusing its weights, returning the
chosen heads' attention outputs at each item's last real token.

Written with plain tensor operations (no cache objects, no mask helpers, no `.tolist()`), so torch.export sees one
static graph whose only dynamic dimensions are the batch and the sequence. Besides Llama-style layers it reproduces
what Gemma 3 adds: per-head q/k norms, norms around the attention and the MLP ("sandwich"), sliding-window layers with
their own rotary table (the tables are keyed by layer type). Attention is computed explicitly
(matmul, masked softmax, matmul) rather than through scaled_dot_product_attention: padded query rows of a left-padded
batch have no key to attend to, and a boolean-masked SDPA turns them into NaN, which then leaks into every later
layer through 0 * NaN; a finite fill keeps them harmless, as transformers does.

Shapes: B batch, S sequence, E hidden, H heads, Hkv key/value heads, d head_dim, k chosen heads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ExportError

# Rope types whose frequencies are fixed at load time; "dynamic" and "longrope" rescale with the sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, scaling: float,
           softcap: float | None = None) -> torch.Tensor:
    """query (n, h, q, d), key/value (n, h, s, d), allowed bool broadcastable to (n, h, q, s) -> (n, q, h, d).
    softcap: Gemma 2's attention logit soft-capping, cap * tanh(scores / cap), before the mask."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = torch.where(allowed, scores, torch.finfo(torch.float32).min)
    weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    return torch.matmul(weights, value).transpose(1, 2)


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) -> (B,) index of each row's last real token, for left and right padding alike."""
    steps = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    return torch.argmax(attention_mask.to(torch.int64) * steps, dim=1)


def token_positions(attention_mask: torch.Tensor, which: str) -> torch.Tensor:
    """(B, S) -> (B,) index of each row's last ("last") or first ("first": an encoder's [CLS]) real token."""
    if which == "last":
        return last_positions(attention_mask)
    if which != "first":
        raise ExportError(f"token position {which!r} is not 'first' or 'last'")
    length = attention_mask.shape[1]
    steps = torch.arange(length, 0, -1, device=attention_mask.device)  # the first real token scores highest
    return torch.argmax(attention_mask.to(torch.int64) * steps, dim=1)


class HeadCapture:
    """Which heads to keep per layer, and the permutation that puts the kept heads (layer by layer, heads sorted) in
    the graph's order: one gather at the end instead of k small slices."""

    def __init__(self, heads: np.ndarray):
        heads = np.asarray(heads, dtype=np.int64)
        self.deepest = int(heads[:, 0].max())
        self.by_layer = {int(layer): sorted({int(h) for l, h in heads if l == layer}) for layer in np.unique(heads[:, 0])}
        flat = [(layer, head) for layer in sorted(self.by_layer) for head in self.by_layer[layer]]
        self.order = torch.tensor([flat.index((int(l), int(h))) for l, h in heads])

    def gather(self, captured: list[torch.Tensor], order: torch.Tensor) -> torch.Tensor:
        """captured: per layer with chosen heads, in layer order, (B, n_layer, d) -> (B, k, d) in the graph's order."""
        return torch.cat(captured, dim=1)[:, order]


def rope_types(text_config: Any) -> list[str]:
    """The rope types of a text config: one, or one per layer type (Gemma 3 nests them by layer type)."""
    rope = getattr(text_config, "rope_parameters", None) or {}
    if rope and all(isinstance(value, dict) for value in rope.values()):
        return [value.get("rope_type", "default") for value in rope.values()]
    return [rope.get("rope_type", "default")]


def layer_windows(text_model: nn.Module, text_config: Any) -> list[int | None]:
    """Per layer, its sliding window (None: full attention). Qwen2 and Gemma 3 set it per attention module; Mistral
    applies the config's to every layer."""
    windows = []
    for block in text_model.layers:
        attention = block.self_attn
        window = attention.sliding_window if hasattr(attention, "sliding_window") else getattr(text_config, "sliding_window", None)
        windows.append(int(window) if window else None)
    return windows


def check_text_model(text_model: nn.Module, text_config: Any, grid: tuple[int, int, int], model_name: str) -> None:
    """Refuse, with a reason, a language model this decoder would not reproduce exactly."""
    for rope_type in rope_types(text_config):
        if rope_type not in STATIC_ROPE_TYPES:
            raise ExportError(f"{model_name}: rope type {rope_type!r} is not exportable (supported: {STATIC_ROPE_TYPES})")
    layer = text_model.layers[0]
    attention = layer.self_attn
    missing = [name for name in _PROJECTIONS if not isinstance(getattr(attention, name, None), nn.Linear)]
    if missing:
        raise ExportError(f"{model_name}: attention lacks the linear projections {missing}; only Llama-style attention is exportable")
    for name in ("use_bidirectional_attention",):
        if getattr(text_config, name, None):
            raise ExportError(f"{model_name}: {name}={getattr(text_config, name)!r} is not implemented by the export decoder")
    if int(attention.head_dim) != grid[2]:
        raise ExportError(f"{model_name}: attention head_dim {attention.head_dim} differs from the grid's {grid[2]}")
    for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
        if not hasattr(layer, name):
            raise ExportError(f"{model_name}: decoder layer lacks {name}; only Llama-style layers are exportable")


FULL_ATTENTION = "full_attention"  # the layer type of models that have one kind of layer


class HeadDecoder(nn.Module):
    """Decoder layers 0..L* returning `heads` at the last real token, in the order given.

    The forward takes rotary tables keyed by layer type (`layer_types`: Gemma 3's sliding layers use another rope
    than its global ones; every other model has one type, FULL_ATTENTION).
    selected_only: in layer L* compute the query of the chosen heads at the last position only (and keys and values
    of the key/value heads they read), skipping everything else that layer would compute.
    """

    def __init__(self, text_model: nn.Module, text_config: Any, heads: np.ndarray, grid: tuple[int, int, int],
                 selected_only: bool = False):
        super().__init__()
        layers_count, self.num_heads, self.head_dim = grid
        picked = HeadCapture(heads)
        self.deepest = picked.deepest
        self.embed_tokens = text_model.embed_tokens
        self.layers = nn.ModuleList(text_model.layers[: self.deepest + 1])
        attention = self.layers[0].self_attn
        self.kv_heads = self.num_heads // int(attention.num_key_value_groups)
        self.scaling = float(attention.scaling)
        self.selected_only = selected_only
        configured = getattr(text_config, "layer_types", None)
        self.layer_types = [str(configured[index]) if configured else FULL_ATTENTION for index in range(self.deepest + 1)]
        self.windows = layer_windows(text_model, text_config)[: self.deepest + 1]
        softcap = getattr(text_config, "attn_logit_softcapping", None)  # Gemma 2
        self.softcap = float(softcap) if softcap else None
        # Gemma 3: norms after the attention and around the MLP; Llama: post_attention_layernorm precedes the MLP.
        self.sandwich = hasattr(self.layers[0], "pre_feedforward_layernorm")

        # Per layer with chosen heads: which heads to keep; then one permutation puts them in the graph's order.
        self.picked = picked
        self.capture = picked.by_layer
        self.register_buffer("order", picked.order, persistent=False)
        if selected_only:
            self._slice_deepest()

    def _slice_deepest(self) -> None:
        """Copies of layer L*'s q/k/v weights restricted to the chosen heads and the key/value heads they read."""
        attention = self.layers[self.deepest].self_attn
        chosen = self.capture[self.deepest]
        group = self.num_heads // self.kv_heads
        kv_needed = sorted({head // group for head in chosen})
        d = self.head_dim

        def rows(head_list: list[int]) -> torch.Tensor:
            return torch.tensor([head * d + i for head in head_list for i in range(d)])

        for name, projection, head_list in (("q", attention.q_proj, chosen), ("k", attention.k_proj, kv_needed), ("v", attention.v_proj, kv_needed)):
            index = rows(head_list)
            self.register_buffer(f"{name}_weight", projection.weight.detach()[index].clone())
            bias = projection.bias.detach()[index].clone() if projection.bias is not None else None
            self.register_buffer(f"{name}_bias", bias)
        # For each chosen head, the position of its key/value head among those kept.
        self.register_buffer("kv_of_chosen", torch.tensor([kv_needed.index(head // group) for head in chosen]), persistent=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                tables: dict[str, tuple[torch.Tensor, torch.Tensor]], image_blocks: torch.Tensor | None = None,
                additions: list[torch.Tensor] | None = None) -> torch.Tensor:
        """hidden (B, S, E) embeddings, attention_mask (B, S), tables: layer type -> cos, sin (B, S, d) -> (B, k, d).

        image_blocks (B, S): Gemma 3's image blocks (an id per image, -1 for text): tokens of one image also attend
        to each other forward (within the window on sliding layers). additions: Qwen3-VL's deepstack, (B, S, E) added
        to the output of layers 0, 1, ... in turn."""
        batch, length, _ = hidden.shape
        last = last_positions(attention_mask)  # (B,)
        rows = torch.arange(batch, device=hidden.device)
        real = attention_mask.to(torch.bool)
        steps = torch.arange(length, device=hidden.device)
        distance = steps[:, None] - steps[None, :]  # (S, S) query index - key index
        ordered = (distance >= 0)[None]  # (1, S, S) causal
        if image_blocks is not None:  # (B, S, S): causal, or both in one image
            ordered = ordered | ((image_blocks[:, :, None] == image_blocks[:, None, :]) & (image_blocks[:, :, None] >= 0))
        masks: dict[int | None, torch.Tensor] = {}

        captured = []
        for index, layer in enumerate(self.layers):
            attention, window = layer.self_attn, self.windows[index]
            cos, sin = tables[self.layer_types[index]]
            normed = layer.input_layernorm(hidden)
            if index == self.deepest and self.selected_only:
                captured.append(self._deepest_selected(normed, real, last, rows, cos, sin, window, ordered, image_blocks is not None))
                break
            if window not in masks:  # causal, real keys only, and within the window if the layer slides
                allowed = ordered if window is None else ordered & (distance < window)[None]
                masks[window] = (allowed & real[:, None, :])[:, None]  # (B, 1, S, S)
            query = self._heads(attention, "q", attention.q_proj(normed), self.num_heads)
            key = self._heads(attention, "k", attention.k_proj(normed), self.kv_heads)
            value = attention.v_proj(normed).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            query = apply_rotary(query, cos[:, None], sin[:, None])
            key = apply_rotary(key, cos[:, None], sin[:, None])
            key, value = self._repeat_kv(key), self._repeat_kv(value)
            per_head = attend(query, key, value, masks[window], self.scaling, self.softcap)  # (B, S, H, d)
            if index in self.capture:
                captured.append(per_head[rows, last][:, self.capture[index]])  # (B, n_layer, d)
            if index == self.deepest:
                break
            attended = attention.o_proj(per_head.reshape(batch, length, self.num_heads * self.head_dim))
            if self.sandwich:
                hidden = hidden + layer.post_attention_layernorm(attended)
                hidden = hidden + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
            else:
                hidden = hidden + attended
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            if additions is not None and index < len(additions):
                hidden = hidden + additions[index]
        return self.picked.gather(captured, self.order)  # (B, k, d)

    def _heads(self, attention: nn.Module, which: str, projected: torch.Tensor, count: int) -> torch.Tensor:
        """(B, S, count * d) -> (B, count, S, d) (count -1: as many as there are), through the per-head norm
        (q_norm / k_norm) when the model has one."""
        batch, length = projected.shape[:2]
        states = projected.view(batch, length, count, self.head_dim).transpose(1, 2)
        norm = getattr(attention, f"{which}_norm", None)
        return norm(states) if norm is not None else states

    def _repeat_kv(self, states: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, S, d) -> (B, H, S, d): each key/value head serves `H / Hkv` query heads."""
        group = self.num_heads // self.kv_heads
        if group == 1:
            return states
        batch, kv_heads, length, d = states.shape
        return states[:, :, None].expand(batch, kv_heads, group, length, d).reshape(batch, kv_heads * group, length, d)

    def _deepest_selected(self, normed: torch.Tensor, real: torch.Tensor, last: torch.Tensor, rows: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, window: int | None, ordered: torch.Tensor,
                          per_item: bool) -> torch.Tensor:
        """Layer L*'s chosen heads at the last position: one query row per item, keys over the real tokens before it."""
        batch, length, _ = normed.shape
        chosen, d = len(self.capture[self.deepest]), self.head_dim
        last_state = normed[rows, last][:, None]  # (B, 1, E)
        attention = self.layers[self.deepest].self_attn
        query = self._heads(attention, "q", nn.functional.linear(last_state, self.q_weight, self.q_bias), chosen)
        key = self._heads(attention, "k", nn.functional.linear(normed, self.k_weight, self.k_bias), -1)
        value = nn.functional.linear(normed, self.v_weight, self.v_bias).view(batch, length, -1, d).transpose(1, 2)
        query = apply_rotary(query, cos[rows, last][:, None, None], sin[rows, last][:, None, None])
        key = apply_rotary(key, cos[:, None], sin[:, None])
        key, value = key[:, self.kv_of_chosen], value[:, self.kv_of_chosen]  # (B, chosen, S, d)
        steps = torch.arange(length, device=normed.device)
        # (B, S): the last token's row of the mask (ordered is (1, S, S) without image blocks, else (B, S, S)).
        allowed = real & (ordered[rows, last] if per_item else ordered[0][last])
        if window is not None:
            allowed = allowed & (last[:, None] - steps[None, :] < window)
        allowed = allowed[:, None, None]  # (B, 1, 1, S)
        return attend(query, key, value, allowed, self.scaling, self.softcap)[:, 0]  # (B, chosen, d)


def rotary_tables(inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (..., S) -> cos, sin (..., S, d): the standard rotary angles, each frequency used twice."""
    angles = positions[..., None].float() * inv_freq.float()
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * scaling, angles.sin() * scaling


class RotaryTables(nn.Module):
    """The text model's rotary tables for plain positions (B, S): one per layer type the decoder uses (Gemma 3 keeps
    `{type}_inv_freq` per layer type; other models one `inv_freq`)."""

    def __init__(self, rotary: nn.Module, layer_types: list[str]):
        super().__init__()
        self.types = sorted(set(layer_types))
        self.scaling = {}
        for layer_type in self.types:
            inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None)
            scaling = getattr(rotary, f"{layer_type}_attention_scaling", None)
            if inv_freq is None:
                inv_freq, scaling = rotary.inv_freq, rotary.attention_scaling
            self.register_buffer(f"inv_freq_{layer_type}", inv_freq.detach().clone(), persistent=False)
            self.scaling[layer_type] = float(scaling)

    def forward(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {layer_type: rotary_tables(getattr(self, f"inv_freq_{layer_type}"), positions, self.scaling[layer_type])
                for layer_type in self.types}
