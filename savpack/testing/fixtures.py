"""Tiny random-weight models of real transformers classes, built offline.

They stand in for hub checkpoints in the demo, the tests and the tools: each fixture is a folder that
`from_pretrained` loads like a downloaded model (config, weights, tokenizer, image processor, chat template).
Weights are random, so what a pack built on them classifies is only as good as chance allows; the pipeline is real.
`build_tokenizer`, `save_model_folder`, `text_config` and `CHATML_TEMPLATE` are the pieces the tools reuse to build
models of other sizes (tools/real_configs.py).
"""

from __future__ import annotations

import json
from pathlib import Path

# A small, fixed word list: enough to tokenise the demo and test prompts without unknown pieces dominating.
_CORPUS = """
a an the this that is are was be of in on at to from for with and or not no yes
what which who where when how why does do did can could should would image picture photo video
shows show showing contains contain there here it its color colour shape red green blue yellow black white
left right top bottom up down big small large circle square triangle stripe stripes dot dots
question answer classify label positive negative good bad great terrible movie film review
sentence text news sports business science world tech spam ham message call free win prize
user assistant system you are helpful describe one two three four five many few
""".split()

_CHAT_ROLES = ("system", "user", "assistant")

# ChatML, the template family of Qwen2 / Qwen2-VL / LLaVA-OneVision; images are rendered as the family's
# placeholder so the processor can expand them.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{IMAGE}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}[{{ message['role'] }}] "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} [/{{ message['role'] }}]\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def build_tokenizer(special_tokens: list[str], chat_template: str | None, bos: str | None = None, eos: str = "<|endoftext|>",
                    named_tokens: dict[str, str] | None = None):
    """A byte-level BPE tokenizer trained on a fixed word list: deterministic, offline, Qwen-like.

    named_tokens: model-specific special tokens a processor reads as tokenizer attributes (Gemma 3's `boi_token`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    named = [eos] + ([bos] if bos else [])
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=named + special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sentences = [" ".join(_CORPUS[i : i + 12]) for i in range(0, len(_CORPUS), 12)]
    backend.train_from_iterator(sentences * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos,
        pad_token=eos,
        bos_token=bos,
        additional_special_tokens=special_tokens,
        **({"model_specific_special_tokens": named_tokens} if named_tokens else {}),
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def save_model_folder(folder: Path, model, tokenizer, image_processor=None, processor_config: dict | None = None) -> Path:
    """Save a model with its tokenizer (and image processor, chat template, processor config) as a hub folder."""
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)
    if image_processor is not None:
        image_processor.save_pretrained(folder)
    if tokenizer.chat_template is not None:
        (folder / "chat_template.jinja").write_text(tokenizer.chat_template)
    if processor_config is not None:
        (folder / "processor_config.json").write_text(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")
    return folder


def text_config(tokenizer, layers: int = 4, heads: int = 8, kv_heads: int = 4, hidden: int = 64, **extra) -> dict:
    """A small decoder config for `tokenizer`: 4 layers x 8 heads of head_dim 8 unless told otherwise."""
    return dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False, **extra)


def _qwen2_vl(folder: Path):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    template = CHATML_TEMPLATE.replace("{IMAGE}", "<|vision_start|><|image_pad|><|vision_end|>")
    tokenizer = build_tokenizer(specials, template)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    config = Qwen2VLConfig(
        # mrope_section sums to head_dim / 2 = 4
        text_config=text_config(tokenizer, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    # 56x56 .. 112x112 pixels: 16 to 64 patches, 4 to 16 image tokens.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    return save_model_folder(folder, Qwen2VLForConditionalGeneration(config), tokenizer, image_processor)


def _llava_onevision(folder: Path):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    specials = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = build_tokenizer(specials, CHATML_TEMPLATE.replace("{IMAGE}", "<image>\n"))
    # anyres: a 28x28 base view plus a grid of 28x28 tiles; the pinpoints must agree between model and processor.
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **text_config(tokenizer)),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
    )
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints)
    processor_config = {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 4,
                        "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}
    return save_model_folder(folder, LlavaOnevisionForConditionalGeneration(config), tokenizer, image_processor, processor_config)


def _qwen2(folder: Path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(["<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE.replace("{IMAGE}", ""))
    return save_model_folder(folder, Qwen2ForCausalLM(Qwen2Config(**text_config(tokenizer))), tokenizer)


def _llama(folder: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    # No chat template: the prompt is the text as is, with the tokenizer's BOS. head_dim 12 != hidden / heads = 8.
    tokenizer = build_tokenizer([], None, bos="<s>")
    tokenizer.add_bos_token = True
    config = LlamaConfig(**text_config(tokenizer, kv_heads=8, head_dim=12))
    return save_model_folder(folder, LlamaForCausalLM(config), tokenizer)


# -- the families of issue 7 ----------------------------------------------------------------------------------------

_QWEN_VL_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_vl_tokenizer():
    template = CHATML_TEMPLATE.replace("{IMAGE}", "<|vision_start|><|image_pad|><|vision_end|>")
    tokenizer = build_tokenizer(_QWEN_VL_SPECIALS, template)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _QWEN_VL_SPECIALS}
    token_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return tokenizer, token_ids


def _qwen2_5_vl(folder: Path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer, token_ids = _qwen_vl_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=text_config(tokenizer, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        # Window attention over 2x2 merged patches (window_size 56 px = 2 x patch 14 x merge 2), full attention in
        # the last block: images of 3x3 merged patches and more span several windows.
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        **token_ids,
    )
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    return save_model_folder(folder, Qwen2_5_VLForConditionalGeneration(config), tokenizer, image_processor)


def _qwen3_vl(folder: Path):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer, token_ids = _qwen_vl_tokenizer()
    # The text head_dim defaults to 128 whatever the hidden size: set it, 12 != hidden / heads = 16 on purpose.
    # Interleaved mrope: its sections sum to head_dim / 2.
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2], "mrope_interleaved": True}
    config = Qwen3VLConfig(
        text_config=text_config(tokenizer, heads=4, kv_heads=2, head_dim=12, rope_parameters=rope),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        **token_ids,
    )
    # Patch 16 x merge 2: 64x64 .. 128x128 pixels give 4 to 16 image tokens.
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, min_pixels=64 * 64, max_pixels=128 * 128)
    return save_model_folder(folder, Qwen3VLForConditionalGeneration(config), tokenizer, image_processor)


# LLaVA-1.5's own prompt format ("USER: <image>\n... ASSISTANT:").
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _llava(folder: Path):
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer(["<image>"], _LLAVA_TEMPLATE, bos="<s>")
    config = LlavaConfig(
        text_config=dict(model_type="llama", **text_config(tokenizer)),
        # CLIP at 28 px, patch 14: 4 patches + CLS; the "default" strategy drops CLS, so 4 image tokens.
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=4,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor_config = {"processor_class": "LlavaProcessor", "patch_size": 14, "num_additional_image_tokens": 1,
                        "vision_feature_select_strategy": "default"}
    return save_model_folder(folder, LlavaForConditionalGeneration(config), tokenizer, image_processor, processor_config)


# Idefics3 / SmolVLM prompt format: "User:<image>text<end_of_utterance>\nAssistant:".
_IDEFICS3_TEMPLATE = (
    "{BOS}{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# An image is split into up to 2x2 tiles of 32 px plus a global view; each gives (32 / 8)^2 / scale_factor^2 = 4 tokens.
_IDEFICS3_GRID_TOKENS = [f"<row_{row}_col_{col}>" for row in range(1, 3) for col in range(1, 3)]


def _idefics3_parts(smolvlm: bool):
    bos = "<|im_start|>" if smolvlm else "<|begin_of_text|>"
    specials = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", *_IDEFICS3_GRID_TOKENS]
    tokenizer = build_tokenizer(specials, _IDEFICS3_TEMPLATE.replace("{BOS}", bos), bos=bos)
    config = dict(
        text_config=dict(model_type="llama", **text_config(tokenizer)),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    image_processor_options = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    return tokenizer, config, image_processor_options


def _idefics3(folder: Path):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer, config, image_options = _idefics3_parts(smolvlm=False)
    model = Idefics3ForConditionalGeneration(Idefics3Config(**config))
    processor_config = {"processor_class": "Idefics3Processor", "image_seq_len": 4}
    return save_model_folder(folder, model, tokenizer, Idefics3ImageProcessorPil(**image_options), processor_config)


def _smolvlm(folder: Path):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    tokenizer, config, image_options = _idefics3_parts(smolvlm=True)
    model = SmolVLMForConditionalGeneration(SmolVLMConfig(**config))
    processor_config = {"processor_class": "SmolVLMProcessor", "image_seq_len": 4}
    return save_model_folder(folder, model, tokenizer, SmolVLMImageProcessorPil(**image_options), processor_config)


_GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _gemma3(folder: Path):
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    specials = ["<start_of_turn>", "<end_of_turn>", *named.values()]
    tokenizer = build_tokenizer(specials, _GEMMA3_TEMPLATE, bos="<bos>", eos="<eos>", named_tokens=named)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in named.items()}
    # Sliding window 16 < the prompt length, alternating with full attention: both masks are exercised.
    text = text_config(tokenizer, heads=4, kv_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"] * 2)
    config = Gemma3Config(
        text_config=dict(model_type="gemma3_text", **text),
        # SigLIP at 32 px, patch 8: 4x4 patches pooled to mm_tokens_per_image = 2x2.
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )
    model = Gemma3ForConditionalGeneration(config)
    # transformers initialises the image projection to zeros (every image then looks the same): draw it at random.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=config.initializer_range)
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor_config = {"processor_class": "Gemma3Processor", "image_seq_length": 4}
    return save_model_folder(folder, model, tokenizer, image_processor, processor_config)


def _gemma3_text(folder: Path):
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # Gemma 3 270M's shape in small: one key/value head, scaled embeddings, q/k norms, sandwich norms, sliding-window
    # layers (window 6 < the test prompts) with their own rope beside global layers with a scaled one.
    tokenizer = build_tokenizer(["<start_of_turn>", "<end_of_turn>"], _GEMMA3_TEMPLATE, bos="<bos>", eos="<eos>")
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}}
    config = Gemma3TextConfig(**text_config(tokenizer, heads=4, kv_heads=1, head_dim=16, query_pre_attn_scalar=16,
                                             sliding_window=6, rope_parameters=rope,
                                             layer_types=["sliding_attention"] * 2 + ["full_attention", "sliding_attention"]))
    model = Gemma3ForCausalLM(config)
    # transformers initialises Gemma's norm weights to zero (scale 1 + w): draw them, so every norm matters.
    for name, parameter in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.normal_(parameter, std=0.3)
    return save_model_folder(folder, model, tokenizer)


def _gpt2(folder: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    # Like the real GPT-2: no chat template, no padding token, learned absolute positions.
    tokenizer = build_tokenizer([], None)
    tokenizer.pad_token = None
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=4, n_head=8, n_positions=1024,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return save_model_folder(folder, GPT2LMHeadModel(config), tokenizer)


def _qwen3(folder: Path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # Qwen3: per-head q/k norms; head_dim 12 != hidden / heads = 8, as its config allows.
    tokenizer = build_tokenizer(["<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE.replace("{IMAGE}", ""))
    model = Qwen3ForCausalLM(Qwen3Config(**text_config(tokenizer, head_dim=12)))
    _randomise_norms(model)
    return save_model_folder(folder, model, tokenizer)


def _gemma(folder: Path):
    from transformers import GemmaConfig, GemmaForCausalLM

    # Gemma (1): scaled embeddings, RMSNorm scales of 1 + w, one key/value head.
    tokenizer = build_tokenizer(["<start_of_turn>", "<end_of_turn>"], _GEMMA3_TEMPLATE, bos="<bos>", eos="<eos>")
    model = GemmaForCausalLM(GemmaConfig(**text_config(tokenizer, heads=4, kv_heads=1, head_dim=16)))
    _randomise_norms(model)
    return save_model_folder(folder, model, tokenizer)


def _gemma2(folder: Path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Gemma 2: attention logit soft-capping (a low cap, so it bites), norms around attention and MLP, sliding-window
    # layers (window 6 < the test prompts) alternating with global ones, query_pre_attn_scalar != head_dim.
    tokenizer = build_tokenizer(["<start_of_turn>", "<end_of_turn>"], _GEMMA3_TEMPLATE, bos="<bos>", eos="<eos>")
    config = Gemma2Config(**text_config(tokenizer, heads=4, kv_heads=2, head_dim=16, query_pre_attn_scalar=32,
                                         sliding_window=6, attn_logit_softcapping=0.02,
                                         layer_types=["sliding_attention", "full_attention"] * 2))
    model = Gemma2ForCausalLM(config)
    _randomise_norms(model)
    return save_model_folder(folder, model, tokenizer)


def _randomise_norms(model) -> None:
    """transformers initialises norm scales to one (or Gemma's zero offsets): draw them, so every norm matters."""
    import torch

    for name, parameter in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.normal_(parameter, mean=0.0 if "gemma" in model.config.model_type else 1.0, std=0.3)


def _bert(folder: Path):
    from transformers import BertConfig, BertModel, BertTokenizer

    # A WordPiece vocabulary of the fixed word list plus single characters (so any text tokenises), like MiniLM's.
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = sorted(set(_CORPUS)) + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(specials + pieces)})
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    return save_model_folder(folder, BertModel(config), tokenizer)


FIXTURES = {"qwen2_vl": _qwen2_vl, "llava_onevision": _llava_onevision, "qwen2": _qwen2, "llama": _llama,
            "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl, "llava": _llava, "idefics3": _idefics3,
            "smolvlm": _smolvlm, "gemma3": _gemma3, "gpt2": _gpt2, "gemma3_text": _gemma3_text, "bert": _bert,
            "qwen3": _qwen3, "gemma": _gemma, "gemma2": _gemma2}


def build_fixture(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Build the tiny random-weight model `name` (see FIXTURES) into `folder`; the same seed gives the same weights."""
    import torch

    if name not in FIXTURES:
        raise KeyError(f"no fixture {name!r}; known: {sorted(FIXTURES)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return FIXTURES[name](Path(folder))
