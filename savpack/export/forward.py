"""Export-friendly forwards per model family, reusing the loaded Hugging Face model's own modules and weights.

Each graph module takes the inputs savpack_runtime.graph_inputs plans (GRAPH_INPUTS[kind], in that order) and returns
`head_vectors` (B, k, head_dim). Every data-dependent step of the Hugging Face forward is either planned on the host
(index tensors) or replaced by tensor arithmetic here; `build_graph_module` picks the module for a model and a prompt.

Shapes: B batch, S sequence, N images, P patches per image (padded), T tiles, D text hidden, E vision hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from savpack_runtime import graph_inputs
from savpack_runtime.pack import Pack

from ..errors import ExportError
from ..models import LoadedModel, find_decoder_layers
from .decoder import HeadDecoder, RotaryTables, apply_rotary, attend, check_text_model
from .learned_positions import BertGraph, GPT2Graph
from .scores import ScoredGraph, output_names

# Language-model types the export decoder reproduces: Llama-style layers (RMSNorm, q/k/v/o, rotary, gated MLP), with
# per-head q/k norms (Qwen3, Gemma 3), scaled embeddings (Gemma), norms around attention and MLP and logit soft-capping
# (Gemma 2), sliding-window layers with their own rope (Gemma 2 and 3, Mistral).
EXPORTABLE_TEXT_TYPES = ("qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "qwen2_vl_text",
                         "qwen2_5_vl_text", "qwen3_vl_text")


@dataclass
class GraphModule:
    module: nn.Module
    kind: str  # a graph_inputs kind: which planner feeds it
    plan_config: dict[str, Any]  # what the planner needs from the model config (stored in bundle.json)
    selected_heads_only: bool = False  # layer L* computes only the chosen heads at the last position
    output_names: tuple[str, ...] = (graph_inputs.OUTPUT_NAME,)

    def __post_init__(self) -> None:
        self.module.eval()  # the wrapper is new (training); the model's own modules stay in eval mode

    @property
    def input_names(self) -> tuple[str, ...]:
        return graph_inputs.input_names(self.kind)

    def scored(self, packs: Sequence[Pack], positions: Sequence[np.ndarray]) -> "GraphModule":
        """The same graph followed by each pack's vote (savpack.export.scores): head_vectors, then per pack its
        graph_inputs.SCORE_ROLES outputs."""
        return replace(self, module=ScoredGraph(self.module, packs, positions), output_names=tuple(output_names(len(packs))))


def build_graph_module(loaded: LoadedModel, heads: np.ndarray, image_count: int, selected_only: bool = False,
                       token_position: str = "last") -> GraphModule:
    """The export forward for `loaded` returning `heads` (k, 2) at the last (or, for encoders, the first) real token;
    image_count 0 gives a text-only graph."""
    family = loaded.family.name
    if token_position not in loaded.family.token_positions:
        raise ExportError(f"{loaded.model_id}: the {family} family reads heads at {list(loaded.family.token_positions)}, "
                          f"not at the {token_position!r} token")
    # BERT and GPT-2 always compute layer L* whole (selected_only applies to the rotary decoder).
    if family == "bert":
        return GraphModule(BertGraph(loaded.model.base_model, heads, loaded.grid, token_position, loaded.model_id),
                           graph_inputs.BERT, {"token_position": token_position})
    if family == "gpt2":
        return GraphModule(GPT2Graph(loaded.model.base_model, heads, loaded.grid, loaded.model_id), graph_inputs.TEXT, {})
    text_config = loaded.model.config.get_text_config(decoder=True)
    if text_config.model_type not in EXPORTABLE_TEXT_TYPES:
        raise ExportError(f"{loaded.model_id}: language model type {text_config.model_type!r} is not exportable yet "
                          f"(exportable: {', '.join(EXPORTABLE_TEXT_TYPES)})")
    layers_path, _ = find_decoder_layers(loaded.model, loaded.grid[0], loaded.model_id)
    text_model = loaded.model.get_submodule(layers_path.rsplit(".", 1)[0])
    check_text_model(text_model, text_config, loaded.grid, loaded.model_id)
    decoder = HeadDecoder(text_model, text_config, heads, loaded.grid, selected_only)
    rotary = text_model.rotary_emb
    if image_count == 0 or not loaded.family.takes_images:
        return GraphModule(TextGraph(decoder, rotary), graph_inputs.TEXT, {}, selected_only)
    graphs = {graph_inputs.QWEN2_VL: Qwen2VLGraph, graph_inputs.QWEN2_5_VL: Qwen2_5_VLGraph,
              graph_inputs.QWEN3_VL: Qwen3VLGraph, graph_inputs.LLAVA_ONEVISION: LlavaOnevisionGraph,
              graph_inputs.LLAVA: LlavaGraph, graph_inputs.GEMMA3: Gemma3Graph, "idefics3": Idefics3Graph,
              "smolvlm": Idefics3Graph}
    if family not in graphs:
        raise ExportError(f"{loaded.model_id}: family {family!r} has no image export yet")
    module = graphs[family](loaded, decoder, rotary)
    kind = graph_inputs.IDEFICS3 if family == "smolvlm" else family
    return GraphModule(module, kind, module.plan_config, selected_only)


def plain_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) positions 0..S-1 whatever the padding, as transformers counts them when given no position_ids."""
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)


class TextGraph(nn.Module):
    """Text-only: token embeddings, plain positions, the decoder."""

    def __init__(self, decoder: HeadDecoder, rotary: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.rotary = RotaryTables(rotary, decoder.layer_types)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.decoder.embed(input_ids)
        return self.decoder(hidden, attention_mask, self.rotary(plain_positions(input_ids)))


class Qwen2VLGraph(nn.Module):
    """Qwen2-VL: the vision tower on per-image padded patches, the merger, image features scattered into the text by
    planned indices, M-RoPE positions from the plan, the decoder."""

    def __init__(self, loaded: LoadedModel, decoder: HeadDecoder, rotary: nn.Module):
        super().__init__()
        config = loaded.model.config
        self.visual = loaded.model.model.visual
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
        merged = self.image_features(pixel_values, patch_index, patch_mask, patch_positions)
        return self._text(input_ids, attention_mask, position_ids, image_token_index, merged)

    def image_features(self, pixel_values, patch_index, patch_mask, patch_positions):
        """(N * P / merge^2, D): each image's merged features, image after image (padding rows included)."""
        hidden, cos, sin = self._patches(pixel_values, patch_index, patch_positions)
        allowed = patch_mask[:, None, None, :]  # (N, 1, 1, P): padding patches are never attended to
        for block in self.visual.blocks:
            hidden = self._block(block, hidden, cos, sin, allowed)
        return self.visual.merger(hidden)  # merge x merge consecutive patches per row

    def _patches(self, pixel_values, patch_index, patch_positions, position_taps=None):
        """Patch embeddings laid out per image (N, P, E) and the vision rotary tables (N, 1, P, d).
        position_taps: Qwen3-VL's learned position embeddings, (all, 4) indices and weights per patch."""
        images, longest = patch_index.shape
        projection = self.visual.patch_embed.proj  # Conv3d with kernel == stride: a linear map of each patch
        weight = projection.weight
        patches = nn.functional.linear(pixel_values.to(weight.dtype), weight.reshape(weight.shape[0], -1), projection.bias)  # (all, E)
        if position_taps is not None:
            index, weight = position_taps
            patches = patches + (self.visual.pos_embed(index) * weight[..., None].to(patches.dtype)).sum(dim=1)
        inv_freq = self.visual.rotary_pos_emb.inv_freq.float()
        angles = (patch_positions[..., None].float() * inv_freq).reshape(images, longest, -1)  # (N, P, d/2): rows, cols
        angles = torch.cat((angles, angles), dim=-1)
        return patches[patch_index], angles.cos()[:, None], angles.sin()[:, None]

    def _block(self, block, hidden, cos, sin, allowed):
        """One vision block on (n, L, E) sequences (images or windows) with their rotary tables and key mask."""
        count, length, _ = hidden.shape
        attention = block.attn
        qkv = attention.qkv(block.norm1(hidden)).reshape(count, length, 3, self.vision_heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]  # (n, heads, L, d)
        query = apply_rotary(query.float(), cos, sin).to(value.dtype)
        key = apply_rotary(key.float(), cos, sin).to(value.dtype)
        out = attend(query, key, value, allowed, float(attention.scaling)).reshape(count, length, -1)
        hidden = hidden + attention.proj(out)
        return hidden + block.mlp(block.norm2(hidden))

    def _text(self, input_ids, attention_mask, position_ids, image_token_index, merged, deepstack=()):
        """deepstack: Qwen3-VL's extra image features, one (N * P / merge^2, D) per early decoder layer."""
        text = self.decoder.embed(input_ids)
        image_tokens = (input_ids == self.image_token_id)[..., None]
        hidden_text = torch.where(image_tokens, merged[image_token_index].to(text.dtype), text)
        additions = [torch.where(image_tokens, features[image_token_index].to(text.dtype), 0.0) for features in deepstack]

        angles = position_ids[..., None].float() * self.inv_freq.float()  # (3, B, S, d/2)
        angles = (angles * self.mrope_axis[:, None, None, :]).sum(dim=0)  # (B, S, d/2): each frequency's own axis
        angles = torch.cat((angles, angles), dim=-1)
        tables = angles.cos() * self.rope_scaling, angles.sin() * self.rope_scaling
        return self.decoder(hidden_text, attention_mask, {layer_type: tables for layer_type in self.decoder.layer_types},
                            additions=additions or None)


class Qwen2_5_VLGraph(Qwen2VLGraph):
    """Qwen2.5-VL: Qwen2-VL's graph with window attention in the vision tower. Blocks listed in fullatt_block_indexes
    attend over the whole image as in Qwen2-VL; the others over windows of merged patches, gathered per window by
    the planned window_index (padded windows, as images are) and put back in image layout by window_inverse."""

    def __init__(self, loaded: LoadedModel, decoder: HeadDecoder, rotary: nn.Module):
        super().__init__(loaded, decoder, rotary)
        vision_config = loaded.model.config.vision_config
        self.full_attention_blocks = {int(index) for index in vision_config.fullatt_block_indexes}
        self.plan_config.update({"window_size": int(vision_config.window_size), "patch_size": int(vision_config.patch_size)})

    def forward(self, input_ids, attention_mask, pixel_values, patch_index, patch_mask, patch_positions, position_ids,
                image_token_index, window_index, window_mask, window_inverse):
        merged = self.image_features(pixel_values, patch_index, patch_mask, patch_positions, window_index, window_mask,
                                     window_inverse)
        return self._text(input_ids, attention_mask, position_ids, image_token_index, merged)

    def image_features(self, pixel_values, patch_index, patch_mask, patch_positions, window_index=None, window_mask=None,
                       window_inverse=None):
        hidden, cos, sin = self._patches(pixel_values, patch_index, patch_positions)
        images, longest, width = hidden.shape
        windows, window_length = window_index.shape
        allowed = patch_mask[:, None, None, :]  # (N, 1, 1, P)
        window_allowed = window_mask[:, None, None, :]  # (W, 1, 1, Pw)
        # (W, 1, Pw, d): each window's rotary tables, gathered from the image layout.
        window_cos = cos.reshape(images * longest, -1)[window_index][:, None]
        window_sin = sin.reshape(images * longest, -1)[window_index][:, None]
        for index, block in enumerate(self.visual.blocks):
            if index in self.full_attention_blocks:
                hidden = self._block(block, hidden, cos, sin, allowed)
                continue
            windowed = hidden.reshape(images * longest, width)[window_index]  # (W, Pw, E)
            windowed = self._block(block, windowed, window_cos, window_sin, window_allowed)
            hidden = windowed.reshape(windows * window_length, width)[window_inverse]  # (N, P, E)
        return self.visual.merger(hidden)


class Qwen3VLGraph(Qwen2VLGraph):
    """Qwen3-VL: Qwen2-VL's graph with a patch-embedding bias, learned position embeddings resampled bilinearly to
    each image's grid (planned taps and weights), interleaved M-RoPE in the text, and DeepStack: features taken
    after some vision blocks are added to the image tokens' states after the first decoder layers."""

    def __init__(self, loaded: LoadedModel, decoder: HeadDecoder, rotary: nn.Module):
        super().__init__(loaded, decoder, rotary)
        sections = list(rotary.mrope_section)
        half = decoder.head_dim // 2
        # Interleaved: frequency f takes height for f = 1, 4, 7, ... (sections[1] of them), width for f = 2, 5, 8, ...,
        # time for the rest (Qwen3VLTextRotaryEmbedding.recomposition_frequencies).
        axis = np.zeros(half, dtype=np.int64)
        axis[1 : sections[1] * 3 : 3] = 1
        axis[2 : sections[2] * 3 : 3] = 2
        self.register_buffer("mrope_axis", torch.nn.functional.one_hot(torch.tensor(axis), 3).T.float(), persistent=False)
        self.deepstack_blocks = [int(index) for index in self.visual.deepstack_visual_indexes]
        self.plan_config["num_grid_per_side"] = int(self.visual.num_grid_per_side)

    def forward(self, input_ids, attention_mask, pixel_values, patch_index, patch_mask, patch_positions, position_ids,
                image_token_index, position_embed_index, position_embed_weight):
        taps = (position_embed_index, position_embed_weight)
        hidden, cos, sin = self._patches(pixel_values, patch_index, patch_positions, taps)
        allowed = patch_mask[:, None, None, :]
        deepstack = []
        for index, block in enumerate(self.visual.blocks):
            hidden = self._block(block, hidden, cos, sin, allowed)
            if index in self.deepstack_blocks:
                merger = self.visual.deepstack_merger_list[self.deepstack_blocks.index(index)]
                deepstack.append(merger(hidden))
        return self._text(input_ids, attention_mask, position_ids, image_token_index, self.visual.merger(hidden), deepstack)


class ClipStyleTower(nn.Module):
    """A CLIP or SigLIP vision transformer (embeddings, optional CLS and pre-norm, encoder layers with layer_norm1,
    self_attn q/k/v/out_proj, layer_norm2, mlp) up to the deepest hidden state the projector reads.

    Returns the chosen hidden states concatenated on the feature axis, with CLS dropped by the "default" strategy,
    as LLaVA's get_image_features selects them."""

    def __init__(self, tower: nn.Module, feature_layer: int | list[int], strategy: str, post_norm: bool = False):
        super().__init__()
        self.vision = getattr(tower, "vision_model", tower)
        # Gemma 3 reads the tower's last_hidden_state: after every layer and the post-layernorm.
        self.post_norm = self.vision.post_layernorm if post_norm else None
        layers = len(self.vision.encoder.layers)
        wanted = feature_layer if isinstance(feature_layer, list) else [feature_layer]
        # hidden_states[i]: 0 = the encoder's input, i = after encoder layer i; negative counts from the end.
        self.feature_states = [int(index) % (layers + 1) for index in wanted]
        self.depth = max(self.feature_states)
        self.drop_cls = strategy == "default"
        embeddings = self.vision.embeddings
        self.has_cls = getattr(embeddings, "class_embedding", None) is not None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) at the tower's own size -> (n, tokens, E * feature layers)."""
        embeddings = self.vision.embeddings
        patches = embeddings.patch_embedding(pixel_values.to(embeddings.patch_embedding.weight.dtype))  # (n, E, h, w)
        hidden = patches.flatten(2).transpose(1, 2)  # (n, h*w, E)
        if self.has_cls:
            cls = embeddings.class_embedding.to(hidden.dtype).expand(hidden.shape[0], 1, -1)
            hidden = torch.cat((cls, hidden), dim=1)
        hidden = hidden + embeddings.position_embedding.weight[None]
        pre_norm = getattr(self.vision, "pre_layrnorm", None)  # CLIP normalises before the encoder
        if pre_norm is not None:
            hidden = pre_norm(hidden)
        states = [hidden]
        for layer in self.vision.encoder.layers[: self.depth]:
            hidden = hidden + self._attention(layer.self_attn, layer.layer_norm1(hidden))
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
            states.append(hidden)
        if self.post_norm is not None:
            states[-1] = self.post_norm(states[-1])
        chosen = [states[index][:, 1:] if self.drop_cls else states[index] for index in self.feature_states]
        return torch.cat(chosen, dim=-1)

    @staticmethod
    def _attention(attention: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        count, length, _ = hidden.shape
        heads, d = attention.num_heads, attention.head_dim

        def split(projection: nn.Module) -> torch.Tensor:
            return projection(hidden).view(count, length, heads, d).transpose(1, 2)

        allowed = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=hidden.device)
        out = attend(split(attention.q_proj), split(attention.k_proj), split(attention.v_proj), allowed, float(attention.scale))
        return attention.out_proj(out.reshape(count, length, heads * d))


class LlavaOnevisionGraph(nn.Module):
    """LLaVA-OneVision: SigLIP on the planned tiles, the projector, each image token a planned weighted sum of tile
    features (anyres crop and resize as a gather), positions 0..S-1, the decoder."""

    def __init__(self, loaded: LoadedModel, decoder: HeadDecoder, rotary: nn.Module):
        super().__init__()
        model, model_id = loaded.model, loaded.model_id
        config = model.config
        inner = model.model
        if config.vision_config.model_type != "siglip_vision_model":
            raise ExportError(f"{model_id}: vision tower {config.vision_config.model_type!r} is not exportable (SigLIP only)")
        if config.vision_feature_select_strategy != "full":
            raise ExportError(f"{model_id}: vision_feature_select_strategy {config.vision_feature_select_strategy!r} "
                              "is not exportable (only 'full', as LLaVA-OneVision checkpoints use)")
        self.tower = ClipStyleTower(inner.vision_tower, config.vision_feature_layer, "full")
        self.projector = inner.multi_modal_projector
        self.image_newline = inner.image_newline
        self.decoder = decoder
        self.image_token_id = int(config.image_token_id)
        self.rotary = RotaryTables(rotary, decoder.layer_types)
        vision_config = config.vision_config
        self.plan_config = {
            "image_token_id": self.image_token_id, "image_size": int(vision_config.image_size),
            "patch_size": int(vision_config.patch_size), "image_grid_pinpoints": [list(p) for p in config.image_grid_pinpoints],
            "vision_aspect_ratio": str(config.vision_aspect_ratio),
        }

    def forward(self, input_ids, attention_mask, pixel_values, tile_index, image_token_index, image_token_weight):
        channels, height, width = pixel_values.shape[2:]
        tiles = pixel_values.reshape(-1, channels, height, width)[tile_index]  # (T, C, H, W)
        features = self.projector(self.tower(tiles))  # (T, h*w, D)
        features = torch.cat((features.reshape(-1, features.shape[-1]), self.image_newline[None].to(features.dtype)))

        text = self.decoder.embed(input_ids)
        image = (features[image_token_index] * image_token_weight[..., None].to(features.dtype)).sum(dim=2)  # (B, S, D)
        image_tokens = (input_ids == self.image_token_id)[..., None]
        hidden_text = torch.where(image_tokens, image.to(text.dtype), text)
        return self.decoder(hidden_text, attention_mask, self.rotary(plain_positions(input_ids)))


class LlavaGraph(nn.Module):
    """LLaVA-1.5: the CLIP tower on every image (one fixed size), the projector, the image features taking the image
    tokens in order (as masked_scatter fills them: a running count over the flattened batch), the decoder."""

    def __init__(self, loaded: LoadedModel, decoder: HeadDecoder, rotary: nn.Module):
        super().__init__()
        model, model_id = loaded.model, loaded.model_id
        config = model.config
        inner = model.model
        kind = config.vision_config.model_type
        if kind not in ("clip_vision_model", "siglip_vision_model"):
            raise ExportError(f"{model_id}: vision tower {kind!r} is not exportable (CLIP or SigLIP)")
        self.tower = ClipStyleTower(inner.vision_tower, config.vision_feature_layer, config.vision_feature_select_strategy)
        self.projector = inner.multi_modal_projector
        self.decoder = decoder
        self.image_token_id = int(config.image_token_id)
        self.rotary = RotaryTables(rotary, decoder.layer_types)
        vision_config = config.vision_config
        side = int(vision_config.image_size) // int(vision_config.patch_size)
        tokens = side * side + (1 if self.tower.has_cls and not self.tower.drop_cls else 0)
        self.plan_config = {"image_token_id": self.image_token_id, "image_size": int(vision_config.image_size),
                            "tokens_per_image": tokens}

    def forward(self, input_ids, attention_mask, pixel_values):
        features = self.projector(self.tower(pixel_values))  # (N, tokens, D)
        features = features.reshape(-1, features.shape[-1])
        text = self.decoder.embed(input_ids)
        hidden_text = _fill_in_order(text, input_ids == self.image_token_id, features)
        return self.decoder(hidden_text, attention_mask, self.rotary(plain_positions(input_ids)))


class Gemma3Graph(nn.Module):
    """Gemma 3 image-text: SigLIP on every image (one fixed size, post-layernorm), the projector's pooling and
    projection, the features taking the soft image tokens in order (as masked_scatter fills them), and in the
    decoder the tokens of one image attending to each other in both directions (token_type_ids, found in-graph)."""

    def __init__(self, loaded: LoadedModel, decoder: HeadDecoder, rotary: nn.Module):
        super().__init__()
        config, inner = loaded.model.config, loaded.model.model
        if config.vision_config.model_type != "siglip_vision_model":
            raise ExportError(f"{loaded.model_id}: vision tower {config.vision_config.model_type!r} is not exportable (SigLIP only)")
        self.tower = ClipStyleTower(inner.vision_tower, -1, "full", post_norm=True)
        self.projector = inner.multi_modal_projector
        self.decoder = decoder
        self.rotary = RotaryTables(rotary, decoder.layer_types)
        self.image_token_id = int(config.image_token_id)
        # transformers embeds an image token outside the vocabulary as token 0 (its row is replaced anyway).
        self.outside_vocabulary = self.image_token_id >= int(config.text_config.vocab_size)
        self.plan_config = {"image_token_id": self.image_token_id, "image_size": int(config.vision_config.image_size),
                            "tokens_per_image": int(config.mm_tokens_per_image)}

    def forward(self, input_ids, attention_mask, pixel_values):
        features = self.projector(self.tower(pixel_values))  # (N, tokens, D)
        features = features.reshape(-1, features.shape[-1])
        image_tokens = input_ids == self.image_token_id  # (B, S)
        text = self.decoder.embed(torch.where(image_tokens, 0, input_ids) if self.outside_vocabulary else input_ids)
        hidden_text = _fill_in_order(text, image_tokens, features)
        # Image blocks: a run of image tokens is one image; ids count the runs of each row.
        previous = torch.nn.functional.pad(image_tokens, (1, 0), value=False)[:, :-1]
        runs = torch.cumsum((image_tokens & ~previous).to(torch.int64), dim=1) - 1
        blocks = torch.where(image_tokens, runs, -1)
        return self.decoder(hidden_text, attention_mask, self.rotary(plain_positions(input_ids)), image_blocks=blocks)


class Idefics3Graph(nn.Module):
    """Idefics3 and SmolVLM: the vision transformer on every real frame (all frames have the processor's one frame
    size, so their position ids are constants), post-layernorm, the connector's pixel shuffle and projection, the
    features taking the image tokens in order, plain positions, the decoder."""

    def __init__(self, loaded: LoadedModel, decoder: HeadDecoder, rotary: nn.Module):
        super().__init__()
        config, inner = loaded.model.config, loaded.model.model
        self.vision = inner.vision_model
        self.connector = inner.connector
        self.decoder = decoder
        self.rotary = RotaryTables(rotary, decoder.layer_types)
        self.image_token_id = int(config.image_token_id)
        frame = int(loaded.processor.image_processor.max_image_size["longest_edge"])
        patch = int(config.vision_config.patch_size)
        if frame % patch or (frame // patch) % int(config.scale_factor):
            raise ExportError(f"{loaded.model_id}: frames of {frame} px do not divide into {patch}-px patches in groups "
                              f"of the connector's scale factor {config.scale_factor}")
        self.register_buffer("position_ids", _idefics3_position_ids(frame // patch, self.vision.embeddings.num_patches_per_side),
                             persistent=False)
        self.plan_config = {"image_token_id": self.image_token_id, "frame_size": frame,
                            "tokens_per_frame": (frame // patch) ** 2 // int(config.scale_factor) ** 2}

    def forward(self, input_ids, attention_mask, pixel_values):
        embeddings = self.vision.embeddings
        patches = embeddings.patch_embedding(pixel_values.to(embeddings.patch_embedding.weight.dtype))  # (T, E, h, w)
        hidden = patches.flatten(2).transpose(1, 2) + embeddings.position_embedding(self.position_ids)[None]
        for layer in self.vision.encoder.layers:
            hidden = hidden + ClipStyleTower._attention(layer.self_attn, layer.layer_norm1(hidden))
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        features = self.connector(self.vision.post_layernorm(hidden))  # (T, tokens per frame, D)
        text = self.decoder.embed(input_ids)
        hidden_text = _fill_in_order(text, input_ids == self.image_token_id, features.reshape(-1, features.shape[-1]))
        return self.decoder(hidden_text, attention_mask, self.rotary(plain_positions(input_ids)))


def _idefics3_position_ids(patches_per_side: int, grid_side: int) -> torch.Tensor:
    """Idefics3VisionEmbeddings' position ids for a full frame of patches_per_side^2 patches: each patch's fractional
    coordinate bucketed into the learned grid_side x grid_side table (the same float32 operations)."""
    boundaries = torch.arange(1 / grid_side, 1.0, 1 / grid_side)
    fractions = torch.arange(patches_per_side, dtype=torch.float32)[None, :] * (1.0 / torch.tensor([patches_per_side]))[:, None]
    buckets = torch.bucketize(torch.clamp(fractions, max=1.0 - 1e-6), boundaries, right=True)[0]
    return (buckets[:, None] * grid_side + buckets[None, :]).reshape(-1)


def _fill_in_order(text: torch.Tensor, image_tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """text (B, S, D) with the image tokens' rows replaced by `features` (n, D) in order, row-major over the batch,
    as transformers' masked_scatter fills them (a running count over the flattened batch)."""
    order = torch.cumsum(image_tokens.reshape(-1).to(torch.int64), dim=0).reshape(image_tokens.shape) - 1
    image = features[order.clamp(min=0)]  # (B, S, D); rows of text tokens are discarded below
    return torch.where(image_tokens[..., None], image.to(text.dtype), text)
