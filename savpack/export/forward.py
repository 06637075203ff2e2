"""Export-friendly forwards per model family, reusing the loaded Hugging Face model's own modules and weights.

Each graph module takes the inputs savpack_runtime.graph_inputs plans (GRAPH_INPUTS[kind], in that order) and returns
`head_vectors` (B, k, head_dim). Every data-dependent step of the Hugging Face forward is either planned on the host
(index tensors) or replaced by tensor arithmetic here; `build_graph_module` picks the module for a model and a prompt.

Shapes: B batch, S sequence, N images, P patches per image (padded), T tiles, D text hidden, E vision hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from savpack_runtime import graph_inputs

from ..errors import ExportError
from ..models import LoadedModel, find_decoder_layers
from .decoder import HeadDecoder, apply_rotary, attend, check_text_model, rotary_tables

# Language-model types the export decoder reproduces (Llama-style layers: RMSNorm, q/k/v/o, rotary, gated MLP).
EXPORTABLE_TEXT_TYPES = ("qwen2", "llama", "mistral", "qwen2_vl_text")


@dataclass
class GraphModule:
    module: nn.Module
    kind: str  # a graph_inputs kind: which planner feeds it
    plan_config: dict[str, Any]  # what the planner needs from the model config (stored in bundle.json)

    @property
    def input_names(self) -> tuple[str, ...]:
        return graph_inputs.input_names(self.kind)


def build_graph_module(loaded: LoadedModel, heads: np.ndarray, image_count: int, selected_only: bool = False) -> GraphModule:
    """The export forward for `loaded` returning `heads` (k, 2); image_count 0 gives a text-only graph."""
    text_config = loaded.model.config.get_text_config(decoder=True)
    if text_config.model_type not in EXPORTABLE_TEXT_TYPES:
        raise ExportError(f"{loaded.model_id}: language model type {text_config.model_type!r} is not exportable yet "
                          f"(exportable: {', '.join(EXPORTABLE_TEXT_TYPES)})")
    layers_path, _ = find_decoder_layers(loaded.model, loaded.grid[0], loaded.model_id)
    text_model = loaded.model.get_submodule(layers_path.rsplit(".", 1)[0])
    check_text_model(text_model, text_config, loaded.grid, loaded.model_id)
    decoder = HeadDecoder(text_model, heads, loaded.grid, selected_only)
    rotary = text_model.rotary_emb
    if image_count == 0 or not loaded.family.takes_images:
        return GraphModule(TextGraph(decoder, rotary), graph_inputs.TEXT, {})
    if loaded.family.name == graph_inputs.QWEN2_VL:
        module = Qwen2VLGraph(loaded.model, decoder, rotary)
        return GraphModule(module, graph_inputs.QWEN2_VL, module.plan_config)
    if loaded.family.name == graph_inputs.LLAVA_ONEVISION:
        module = LlavaOnevisionGraph(loaded.model, decoder, rotary, loaded.model_id)
        return GraphModule(module, graph_inputs.LLAVA_ONEVISION, module.plan_config)
    raise ExportError(f"{loaded.model_id}: family {loaded.family.name!r} has no image export yet")


class TextGraph(nn.Module):
    """Text-only: token embeddings, positions 0..S-1 (as transformers uses without position_ids), the decoder."""

    def __init__(self, decoder: HeadDecoder, rotary: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone(), persistent=False)
        self.rope_scaling = float(rotary.attention_scaling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.decoder.embed(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)  # (B, S)
        cos, sin = rotary_tables(self.inv_freq, positions, self.rope_scaling)
        return self.decoder(hidden, attention_mask, cos, sin)


class Qwen2VLGraph(nn.Module):
    """Qwen2-VL: the vision tower on per-image padded patches, the merger, image features scattered into the text by
    planned indices, M-RoPE positions from the plan, the decoder."""

    def __init__(self, model: nn.Module, decoder: HeadDecoder, rotary: nn.Module):
        super().__init__()
        config = model.config
        self.visual = model.model.visual
        self.decoder = decoder
        self.image_token_id = int(config.image_token_id)
        self.vision_heads = int(config.vision_config.num_heads)
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone(), persistent=False)
        self.rope_scaling = float(rotary.attention_scaling)
        # M-RoPE: frequency f takes its angle from axis (section index % 3) of the (t, h, w) positions.
        sections = list(rotary.mrope_section)
        axis = np.repeat([i % 3 for i in range(len(sections))], sections)
        self.register_buffer("mrope_axis", torch.nn.functional.one_hot(torch.tensor(axis), 3).T.float(), persistent=False)  # (3, d/2)
        self.plan_config = {"image_token_id": self.image_token_id,
                            "spatial_merge_size": int(config.vision_config.spatial_merge_size)}

    def forward(self, input_ids, attention_mask, pixel_values, patch_index, patch_mask, patch_positions, position_ids,
                image_token_index):
        images, longest = patch_index.shape
        weight = self.visual.patch_embed.proj.weight  # Conv3d with kernel == stride: a linear map of each patch
        patches = nn.functional.linear(pixel_values.to(weight.dtype), weight.reshape(weight.shape[0], -1))  # (all, E)
        hidden = patches[patch_index]  # (N, P, E)

        inv_freq = self.visual.rotary_pos_emb.inv_freq.float()
        angles = (patch_positions[..., None].float() * inv_freq).reshape(images, longest, -1)  # (N, P, d/2): rows, cols
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (N, 1, P, d)
        allowed = patch_mask[:, None, None, :]  # (N, 1, 1, P): padding patches are never attended to
        for block in self.visual.blocks:
            attention = block.attn
            qkv = attention.qkv(block.norm1(hidden)).reshape(images, longest, 3, self.vision_heads, -1).permute(2, 0, 3, 1, 4)
            query, key, value = qkv[0], qkv[1], qkv[2]  # (N, heads, P, d)
            query = apply_rotary(query.float(), cos, sin).to(value.dtype)
            key = apply_rotary(key.float(), cos, sin).to(value.dtype)
            out = attend(query, key, value, allowed, float(attention.scaling)).reshape(images, longest, -1)
            hidden = hidden + attention.proj(out)
            hidden = hidden + block.mlp(block.norm2(hidden))
        merged = self.visual.merger(hidden)  # (N * P / merge^2, D): merge x merge consecutive patches per row

        text = self.decoder.embed(input_ids)
        image_tokens = (input_ids == self.image_token_id)[..., None]
        hidden_text = torch.where(image_tokens, merged[image_token_index].to(text.dtype), text)

        angles = position_ids[..., None].float() * self.inv_freq.float()  # (3, B, S, d/2)
        angles = (angles * self.mrope_axis[:, None, None, :]).sum(dim=0)  # (B, S, d/2): each frequency's own axis
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos() * self.rope_scaling, angles.sin() * self.rope_scaling
        return self.decoder(hidden_text, attention_mask, cos, sin)


class LlavaOnevisionGraph(nn.Module):
    """LLaVA-OneVision: SigLIP on the planned tiles, the projector, each image token a planned weighted sum of tile
    features (anyres crop and resize as a gather), positions 0..S-1, the decoder."""

    def __init__(self, model: nn.Module, decoder: HeadDecoder, rotary: nn.Module, model_id: str):
        super().__init__()
        config = model.config
        inner = model.model
        if config.vision_config.model_type != "siglip_vision_model":
            raise ExportError(f"{model_id}: vision tower {config.vision_config.model_type!r} is not exportable (SigLIP only)")
        if config.vision_feature_select_strategy != "full":
            raise ExportError(f"{model_id}: vision_feature_select_strategy {config.vision_feature_select_strategy!r} "
                              "is not exportable (only 'full', as LLaVA-OneVision checkpoints use)")
        tower = inner.vision_tower
        self.vision = getattr(tower, "vision_model", tower)
        self.projector = inner.multi_modal_projector
        self.image_newline = inner.image_newline
        self.decoder = decoder
        self.image_token_id = int(config.image_token_id)
        layers = len(self.vision.encoder.layers)
        wanted = config.vision_feature_layer if isinstance(config.vision_feature_layer, list) else [config.vision_feature_layer]
        # hidden_states[i]: 0 = embeddings, i = after encoder layer i; negative counts from the end (layers + 1 states).
        self.feature_states = [int(index) % (layers + 1) for index in wanted]
        self.vision_layers = max(self.feature_states)
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone(), persistent=False)
        self.rope_scaling = float(rotary.attention_scaling)
        vision_config = config.vision_config
        self.plan_config = {
            "image_token_id": self.image_token_id, "image_size": int(vision_config.image_size),
            "patch_size": int(vision_config.patch_size), "image_grid_pinpoints": [list(p) for p in config.image_grid_pinpoints],
            "vision_aspect_ratio": str(config.vision_aspect_ratio),
        }

    def forward(self, input_ids, attention_mask, pixel_values, tile_index, image_token_index, image_token_weight):
        channels, height, width = pixel_values.shape[2:]
        tiles = pixel_values.reshape(-1, channels, height, width)[tile_index]  # (T, C, H, W)
        embeddings = self.vision.embeddings
        patches = embeddings.patch_embedding(tiles.to(embeddings.patch_embedding.weight.dtype))  # (T, E, h, w)
        hidden = patches.flatten(2).transpose(1, 2) + embeddings.position_embedding.weight[None]  # (T, h*w, E)
        states = [hidden]
        for layer in self.vision.encoder.layers[: self.vision_layers]:
            hidden = hidden + self._vision_attention(layer.self_attn, layer.layer_norm1(hidden))
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
            states.append(hidden)
        selected = torch.cat([states[index] for index in self.feature_states], dim=-1)
        features = self.projector(selected)  # (T, h*w, D)
        features = torch.cat((features.reshape(-1, features.shape[-1]), self.image_newline[None].to(features.dtype)))

        text = self.decoder.embed(input_ids)
        image = (features[image_token_index] * image_token_weight[..., None].to(features.dtype)).sum(dim=2)  # (B, S, D)
        image_tokens = (input_ids == self.image_token_id)[..., None]
        hidden_text = torch.where(image_tokens, image.to(text.dtype), text)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)  # (B, S)
        cos, sin = rotary_tables(self.inv_freq, positions, self.rope_scaling)
        return self.decoder(hidden_text, attention_mask, cos, sin)

    @staticmethod
    def _vision_attention(attention: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        tiles, length, _ = hidden.shape
        heads, d = attention.num_heads, attention.head_dim

        def split(projection: nn.Module) -> torch.Tensor:
            return projection(hidden).view(tiles, length, heads, d).transpose(1, 2)

        allowed = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=hidden.device)
        out = attend(split(attention.q_proj), split(attention.k_proj), split(attention.v_proj), allowed, float(attention.scale))
        return attention.out_proj(out.reshape(tiles, length, heads * d))

