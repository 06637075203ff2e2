"""Model families: what differs between architectures, each family a few lines.

A family says which transformers Auto class loads the model, how its inputs are prepared (processor or tokenizer),
and how many images an item may carry. Everything else (finding the decoder layers and their attention output
projections, the head grid) is read from the model's structure and config, the same for every family.

Adding a family: write a `Family(...)` below and register it in FAMILIES; add its tiny fixture in savpack/testing/fixtures.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values this family handles
    auto_class: str  # transformers Auto class that loads the model with its decoder
    processor_class: str | None = None  # transformers processor class for image-text families, None for text-only
    padding_side: str = "left"
    # Extra forward inputs the processor returns that the model needs (names passed through as they are).
    forward_inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    description: str = ""
    # Learned absolute position embeddings (GPT-2): the model counts positions from the first column, padding
    # included, so a left-padded item needs position_ids counted over its real tokens only.
    positions_from_mask: bool = False
    # Token positions whose head outputs classify (savpack_runtime.format.TOKEN_POSITIONS), the default first. A
    # decoder's first token sees only itself, so decoders offer "last" only.
    token_positions: tuple[str, ...] = ("last",)

    @property
    def takes_images(self) -> bool:
        return self.processor_class is not None


CAUSAL_LM = Family(
    name="causal_lm",
    model_types=("qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text"),
    auto_class="AutoModelForCausalLM",
    description="text-only decoder LMs (Qwen2, Llama, Gemma 3 text, ...)",
)
QWEN2_VL = Family(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    auto_class="AutoModelForImageTextToText",
    processor_class="Qwen2VLProcessor",
    forward_inputs=("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"),
    description="Qwen2-VL",
)
LLAVA_ONEVISION = Family(
    name="llava_onevision",
    model_types=("llava_onevision",),
    auto_class="AutoModelForImageTextToText",
    processor_class="LlavaOnevisionProcessor",
    forward_inputs=("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images"),
    description="LLaVA-OneVision",
)

_QWEN_VL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
QWEN2_5_VL = Family(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    auto_class="AutoModelForImageTextToText",
    processor_class="Qwen2_5_VLProcessor",
    forward_inputs=_QWEN_VL_INPUTS,
    description="Qwen2.5-VL",
)
QWEN3_VL = Family(
    name="qwen3_vl",
    model_types=("qwen3_vl",),
    auto_class="AutoModelForImageTextToText",
    processor_class="Qwen3VLProcessor",
    forward_inputs=_QWEN_VL_INPUTS,
    description="Qwen3-VL (dense)",
)
LLAVA = Family(
    name="llava",
    model_types=("llava",),
    auto_class="AutoModelForImageTextToText",
    processor_class="LlavaProcessor",
    forward_inputs=("input_ids", "attention_mask", "pixel_values"),
    description="LLaVA-1.5 (LlavaForConditionalGeneration)",
)
_IDEFICS3_INPUTS = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
IDEFICS3 = Family(
    name="idefics3",
    model_types=("idefics3",),
    auto_class="AutoModelForImageTextToText",
    processor_class="Idefics3Processor",
    forward_inputs=_IDEFICS3_INPUTS,
    description="Idefics3",
)
SMOLVLM = Family(
    name="smolvlm",
    model_types=("smolvlm",),
    auto_class="AutoModelForImageTextToText",
    processor_class="SmolVLMProcessor",
    forward_inputs=_IDEFICS3_INPUTS,
    description="SmolVLM (its processor needs num2words: pip install 'savpack[smolvlm]')",
)
GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3",),
    auto_class="AutoModelForImageTextToText",
    processor_class="Gemma3Processor",
    # token_type_ids marks image tokens, which attend to each other bidirectionally: without it the forward
    # runs, with a causal mask over the image, and silently gives other activations.
    forward_inputs=("input_ids", "attention_mask", "pixel_values", "token_type_ids"),
    description="Gemma 3 image-text (Gemma3ForConditionalGeneration); text-only Gemma 3 is causal_lm",
)
GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    auto_class="AutoModelForCausalLM",
    positions_from_mask=True,
    description="GPT-2 (attention output projection is the Conv1D attn.c_proj)",
)
BERT = Family(
    name="bert",
    model_types=("bert",),
    auto_class="AutoModel",
    # Right padding keeps BERT's absolute positions; positions are gathered per row either way.
    padding_side="right",
    forward_inputs=("input_ids", "attention_mask", "token_type_ids"),
    description="BERT encoders (all-MiniLM, ...): heads at [CLS] (first) or at the last real token ([SEP])",
    token_positions=("first", "last"),
)

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (QWEN2_VL, LLAVA_ONEVISION, CAUSAL_LM, QWEN2_5_VL, QWEN3_VL, LLAVA, IDEFICS3, SMOLVLM, GEMMA3, GPT2, BERT)
}


def family_for_model_type(model_type: str) -> Family | None:
    return next((family for family in FAMILIES.values() if model_type in family.model_types), None)


def supported_summary() -> str:
    return "; ".join(f"{family.name} ({', '.join(family.model_types)})" for family in FAMILIES.values())
