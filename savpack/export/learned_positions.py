"""Export forwards for the transformers with learned absolute positions: BERT encoders and GPT-2.

Like the decoder of decoder.py, each runs its model's layers 0..L* with the model's own modules and weights and plain
tensor operations, and returns the chosen heads' attention outputs (the input of the attention output projection) at
one real token per item. What differs from Llama-style decoders:
- BERT: word + position + segment embeddings and a LayerNorm; bidirectional attention over the real tokens;
  post-norm layers; heads at the first real token ([CLS]) or the last ([SEP]), as the pack says. Positions are
  0..S-1 (right padding, as the family pads, keeps them equal to each item's own).
- GPT-2: positions counted over real tokens only, (mask.cumsum - 1).clamp(0), computed in the graph from the mask,
  exactly what the builder passes as position_ids (left padding would otherwise shift them); Conv1D projections
  (c_attn splits into query, key, value); pre-norm blocks.

Shapes: B batch, S sequence, E hidden, H heads, d head_dim, k chosen heads.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from .decoder import HeadCapture, attend, last_positions, token_positions


class BertGraph(nn.Module):
    """BERT layers 0..L*: heads at the first or last real token. Inputs input_ids, attention_mask, token_type_ids."""

    def __init__(self, model: nn.Module, heads: np.ndarray, grid: tuple[int, int, int], token_position: str, model_name: str):
        super().__init__()
        config = model.config
        position_type = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if position_type != "absolute" or getattr(config, "is_decoder", False):
            raise ExportError(f"{model_name}: BERT with position_embedding_type={position_type!r}"
                              f"{' as a decoder' if config.is_decoder else ''} is not exportable (absolute positions, encoder only)")
        _, self.num_heads, self.head_dim = grid
        self.picked = HeadCapture(heads)
        self.register_buffer("order", self.picked.order, persistent=False)
        self.embeddings = model.embeddings
        self.layers = nn.ModuleList(model.encoder.layer[: self.picked.deepest + 1])
        self.token_position = token_position

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        embeddings = self.embeddings
        positions = torch.arange(length, device=input_ids.device)[None]
        hidden = embeddings.word_embeddings(input_ids) + embeddings.token_type_embeddings(token_type_ids)
        hidden = embeddings.LayerNorm(hidden + embeddings.position_embeddings(positions))
        at = token_positions(attention_mask, self.token_position)  # (B,)
        rows = torch.arange(batch, device=input_ids.device)
        allowed = attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, S): every token sees every real token
        captured = []
        for index, layer in enumerate(self.layers):
            attention = layer.attention.self

            def split(projection: nn.Module) -> torch.Tensor:
                return projection(hidden).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

            per_head = attend(split(attention.query), split(attention.key), split(attention.value), allowed,
                              float(attention.scaling))  # (B, S, H, d)
            if index in self.picked.by_layer:
                captured.append(per_head[rows, at][:, self.picked.by_layer[index]])
            if index == self.picked.deepest:
                break
            attended = layer.attention.output(per_head.reshape(batch, length, -1), hidden)  # dense, residual, LayerNorm
            hidden = layer.output(layer.intermediate(attended), attended)
        return self.picked.gather(captured, self.order)


class GPT2Graph(nn.Module):
    """GPT-2 blocks 0..L*: heads at the last real token, positions counted over real tokens."""

    def __init__(self, model: nn.Module, heads: np.ndarray, grid: tuple[int, int, int], model_name: str):
        super().__init__()
        if getattr(model.config, "add_cross_attention", False):
            raise ExportError(f"{model_name}: GPT-2 with cross-attention is not exportable")
        _, self.num_heads, self.head_dim = grid
        self.picked = HeadCapture(heads)
        self.register_buffer("order", self.picked.order, persistent=False)
        self.wte, self.wpe = model.wte, model.wpe
        self.blocks = nn.ModuleList(model.h[: self.picked.deepest + 1])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        positions = (attention_mask.to(torch.int64).cumsum(-1) - 1).clamp(min=0)
        hidden = self.wte(input_ids) + self.wpe(positions)
        last = last_positions(attention_mask)
        rows = torch.arange(batch, device=input_ids.device)
        steps = torch.arange(length, device=input_ids.device)
        allowed = ((steps[:, None] >= steps[None, :])[None] & attention_mask.to(torch.bool)[:, None, :])[:, None]  # (B, 1, S, S)
        width = self.num_heads * self.head_dim
        captured = []
        for index, block in enumerate(self.blocks):
            attention = block.attn
            query, key, value = (part.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
                                 for part in attention.c_attn(block.ln_1(hidden)).split(width, dim=2))
            per_head = attend(query, key, value, allowed, float(attention.scaling))  # (B, S, H, d)
            if index in self.picked.by_layer:
                captured.append(per_head[rows, last][:, self.picked.by_layer[index]])
            if index == self.picked.deepest:
                break
            hidden = hidden + attention.c_proj(per_head.reshape(batch, length, width))
            hidden = hidden + block.mlp(block.ln_2(hidden))
        return self.picked.gather(captured, self.order)
