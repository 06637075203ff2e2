"""Model families: what differs between architectures, each family a few lines.

A family says which transformers Auto class loads the model, how its inputs are prepared (processor or tokenizer),
and how many images an item may carry. Everything else (finding the decoder layers and their attention output
projections, the head grid) is read from the model's structure and config, the same for every family.

Adding a family: write a `Family(...)` below and register it in FAMILIES; add its tiny fixture in fixtures.py.
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

FAMILIES: dict[str, Family] = {family.name: family for family in (QWEN2_VL, LLAVA_ONEVISION, CAUSAL_LM)}


def family_for_model_type(model_type: str) -> Family | None:
    return next((family for family in FAMILIES.values() if model_type in family.model_types), None)


def supported_summary() -> str:
    return "; ".join(f"{family.name} ({', '.join(family.model_types)})" for family in FAMILIES.values())
