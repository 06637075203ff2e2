"""GGUF models: loaded directly, and converted once into a plain folder that gives the same activations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from savpack.cli import main
from savpack.data import load_examples
from savpack.extract import extract
from savpack.models import load_model

gguf = pytest.importorskip("gguf")

# transformers' Qwen2 names -> llama.cpp's GGUF names.
_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf_name(name: str) -> str:
    if name.startswith("model.layers."):
        _, _, layer, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{layer}.{_NAMES[module]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[name]


def write_qwen2_gguf(folder, path) -> None:
    """The tiny Qwen2 fixture as a float32 GGUF file, written the way llama.cpp lays one out."""
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    vocab = tokenizer["model"]["vocab"]
    special = {token["id"] for token in tokenizer["added_tokens"] if token["special"]}
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if vocab[token] in special else 1 for token in tokens])
    writer.add_token_merges([" ".join(merge) for merge in tokenizer["model"]["merges"]])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    for name, array in sorted(load_file(folder / "model.safetensors").items()):
        writer.add_tensor(_gguf_name(name), array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_loads_directly_and_converts_to_the_same_model(model_dir, text_task, tmp_path):
    original = model_dir("qwen2")
    gguf_path = tmp_path / "tiny-qwen2.gguf"
    write_qwen2_gguf(original, gguf_path)
    examples = load_examples(text_task[1])[:6]

    direct = load_model(str(gguf_path), device="cpu")
    by_name = load_model(str(tmp_path), gguf_file=gguf_path.name, device="cpu")
    out = tmp_path / "converted"
    result = CliRunner().invoke(main, ["convert-gguf", str(gguf_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    converted = load_model(str(out), device="cpu")

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "qwen2"
    assert json.loads((out / "savpack_conversion.json").read_text())["source"] == gguf_path.name
    # Same weights as the model the file was written from, and the same fingerprint whichever way it loads.
    reference = load_model(str(original), device="cpu")
    for (name, ours), (_, theirs) in zip(sorted(converted.model.state_dict().items()), sorted(reference.model.state_dict().items())):
        assert np.array_equal(ours.numpy(), theirs.numpy()), name
    assert direct.fingerprint() == by_name.fingerprint() == converted.fingerprint() == reference.fingerprint()
    vectors = [extract(loaded, examples, batch_size=3, final_hidden=True, progress=False) for loaded in (direct, by_name, converted)]
    for other in vectors[1:]:
        assert [ids.tolist() for ids in other.input_ids] == [ids.tolist() for ids in vectors[0].input_ids]
        np.testing.assert_array_equal(other.vectors, vectors[0].vectors)
        np.testing.assert_array_equal(other.final_hidden, vectors[0].final_hidden)
    again = CliRunner().invoke(main, ["convert-gguf", str(gguf_path), "--out", str(out)])
    assert again.exit_code == 1 and "exists" in again.output
