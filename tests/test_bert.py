"""The BERT encoder family: heads at [CLS] ("first") or the last real token, found structurally, batched == single,
and a pack that records which token it uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from savpack.data import Example, load_examples
from savpack.errors import DataError
from savpack.extract import extract
from savpack.pipeline import classify, extract_activations, pack_from_activations
from savpack_runtime import Pack
from savpack_runtime.errors import PackValueError

TEXTS = ["the red circle is here", "blue", "a big yellow square is at the top left of the picture", "no"]


def _examples(texts):
    return [Example(text=text, label="x", source=f"item {i}") for i, text in enumerate(texts)]


def test_bert_attention_outputs_are_the_attention_output_dense(loaded_model):
    loaded = loaded_model("bert")
    assert loaded.family.name == "bert" and loaded.grid == (3, 4, 16)
    names = {module: name for name, module in loaded.model.named_modules()}
    assert [names[module] for module in loaded.attention_outputs] == [
        f"encoder.layer.{i}.attention.output.dense" for i in range(3)]


@pytest.mark.parametrize("position", ["first", "last"])
def test_bert_batched_equals_one_by_one(position, loaded_model):
    loaded = loaded_model("bert")
    batched = extract(loaded, _examples(TEXTS), batch_size=4, final_hidden=True, progress=False, token_position=position)
    single = extract(loaded, _examples(TEXTS), batch_size=1, final_hidden=True, progress=False, token_position=position)
    assert np.abs(batched.vectors - single.vectors).max() <= 1e-5
    assert np.abs(batched.final_hidden - single.final_hidden).max() <= 1e-5


def test_bert_positions_are_cls_and_sep(loaded_model):
    """Head vectors at "first" are the attention output at [CLS]; at "last" at [SEP], recomputed by hand."""
    loaded = loaded_model("bert")
    examples = _examples(TEXTS[:2])
    first = extract(loaded, examples, batch_size=2, progress=False, token_position="first").vectors
    last = extract(loaded, examples, batch_size=2, progress=False, token_position="last").vectors
    layer = loaded.model.encoder.layer[1].attention.self
    for row, example in enumerate(examples):
        encoded = loaded.encode([example.text], [[]])
        ids = encoded["input_ids"][0].tolist()
        assert ids[0] == loaded.tokenizer.cls_token_id and ids[-1] == loaded.tokenizer.sep_token_id
        with torch.inference_mode():
            hidden = loaded.model(**encoded, output_hidden_states=True).hidden_states[1][0]  # input of layer 1
            q, k, v = (projection(hidden).reshape(len(ids), 4, 16).transpose(0, 1)
                       for projection in (layer.query, layer.key, layer.value))
            context = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1) @ v  # (heads, seq, head_dim)
        np.testing.assert_allclose(first[row, 1], context[:, 0].numpy(), atol=1e-5)
        np.testing.assert_allclose(last[row, 1], context[:, -1].numpy(), atol=1e-5)


def test_decoders_refuse_the_first_token(loaded_model):
    with pytest.raises(DataError, match="token position 'first' is not offered by the causal_lm family"):
        extract(loaded_model("qwen2"), _examples(TEXTS[:1]), progress=False, token_position="first")


def test_the_pack_records_its_token_position_and_classify_uses_it(loaded_model, text_task):
    loaded = loaded_model("bert")
    train = load_examples(text_task[0])
    activations = extract_activations(loaded, train, progress=False)
    assert activations.prompt["token_position"] == "first"  # the family's default
    pack = Pack.from_bytes(pack_from_activations(activations, k=5).to_bytes())
    assert pack.token_position == "first"
    test = load_examples(text_task[1])
    at_first = classify(loaded, pack, test, progress=False).extraction.vectors
    heads = pack.heads
    expected = extract(loaded, test, heads=heads, progress=False, token_position="first").vectors
    np.testing.assert_array_equal(at_first, expected)
    as_last = pack.replace(prompt={**pack.prompt, "token_position": "last"})
    at_last = classify(loaded, as_last, test, progress=False).extraction.vectors
    assert np.abs(at_first - at_last).max() > 1e-3


def test_pack_token_position_is_validated_and_defaults_to_last(loaded_model, text_task):
    activations = extract_activations(loaded_model("qwen2"), load_examples(text_task[0]), progress=False)
    pack = pack_from_activations(activations, k=3)
    assert pack.token_position == "last"
    old_style = pack.replace(prompt={key: value for key, value in pack.prompt.items() if key != "token_position"})
    assert Pack.from_bytes(old_style.to_bytes()).token_position == "last"
    with pytest.raises(PackValueError, match="token_position"):
        pack.replace(prompt={**pack.prompt, "token_position": "middle"}).to_bytes()
