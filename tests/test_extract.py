"""Extraction reads the right tensor at the right token, and computes nothing it does not need."""

import numpy as np
import pytest
import torch

from savpack.data import Example, load_examples
from savpack.extract import extract, last_positions


def test_last_positions_for_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    assert last_positions(mask).tolist() == [3, 3, 1]


# Where transformers 5 keeps each layer's attention output projection in these classes, written out rather than found
# by savpack's structural search (models.find_attention_outputs), so the oracle does not share its code.
PROJECTIONS = {"qwen2": "model.layers.{layer}.self_attn.o_proj",
               "qwen2_vl": "model.language_model.layers.{layer}.self_attn.o_proj"}


@pytest.mark.parametrize("name", ["qwen2", "qwen2_vl"])
def test_vectors_equal_the_full_models_attention_output(name, loaded_model, colour_task, text_task):
    """Hook the unmodified full forward (with LM head) at the projections' known paths: extract() must give the same
    per-head values."""
    loaded = loaded_model(name)
    examples = load_examples((colour_task if name == "qwen2_vl" else text_task)[0])[:3]
    got = extract(loaded, examples, batch_size=3, progress=False).vectors  # (N, L, H, D)
    layers, heads, head_dim = loaded.grid
    for row, example in enumerate(examples):
        from savpack_runtime.images import load_image

        inputs = loaded.encode([loaded.render("{text}", example.text, len(example.images))],
                               [[load_image(p) for p in example.images]])
        seen = {}
        projections = [loaded.model.get_submodule(PROJECTIONS[name].format(layer=layer)) for layer in range(layers)]
        handles = [module.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0][0, -1]))
                   for i, module in enumerate(projections)]
        with torch.no_grad():
            loaded.model(**inputs)
        for handle in handles:
            handle.remove()
        expected = torch.stack([seen[i] for i in range(layers)]).reshape(layers, heads, head_dim).numpy()
        assert np.abs(got[row] - expected).max() < 1e-5


def test_nothing_after_the_deepest_layer_runs(loaded_model, text_task):
    loaded = loaded_model("qwen2")
    examples = load_examples(text_task[0])[:2]
    calls: list[str] = []
    layers = loaded.model.model.layers
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(f"layer{i}")) for i, layer in enumerate(layers)]
    handles.append(loaded.model.model.norm.register_forward_hook(lambda *a: calls.append("norm")))
    handles.append(loaded.model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head")))
    mlp_calls: list[int] = []
    handles += [layer.mlp.register_forward_hook(lambda m, a, o, i=i: mlp_calls.append(i)) for i, layer in enumerate(layers)]
    try:
        extract(loaded, examples, heads=np.array([[1, 3], [0, 2]]), progress=False)
        # layer 0 completes; layer 1 stops inside attention, before its MLP; layers 2, 3, norm, LM head never run
        assert calls == ["layer0"] and mlp_calls == [0]
        calls.clear(), mlp_calls.clear()
        extract(loaded, examples, progress=False)  # all heads: stops in the last layer's attention
        assert calls == ["layer0", "layer1", "layer2"] and "lm_head" not in calls
        calls.clear()
        extract(loaded, examples, final_hidden=True, progress=False)  # the hidden-state baselines need the norm
        assert calls == ["layer0", "layer1", "layer2", "layer3", "norm"]
    finally:
        for handle in handles:
            handle.remove()


def test_chosen_heads_come_back_in_the_requested_order(loaded_model, text_task):
    loaded = loaded_model("llama")
    examples = load_examples(text_task[0])[:4]
    everything = extract(loaded, examples, progress=False).vectors
    heads = np.array([[2, 5], [0, 1], [2, 0], [1, 7]])
    chosen = extract(loaded, examples, heads=heads, batch_size=3, progress=False).vectors
    assert np.abs(chosen - everything[:, heads[:, 0], heads[:, 1]]).max() < 1e-5


def test_input_ids_are_the_unpadded_tokens(loaded_model):
    loaded = loaded_model("qwen2")
    examples = [Example("red"), Example("the blue circle is big and the red square is small")]
    result = extract(loaded, examples, batch_size=2, progress=False)
    for example, ids in zip(examples, result.input_ids):
        expected = loaded.tokenizer(loaded.render("{text}", example.text, 0), add_special_tokens=False)["input_ids"]
        assert ids.tolist() == expected


def test_too_long_text_is_refused_with_its_source(loaded_model):
    from savpack.errors import DataError

    loaded = loaded_model("qwen2")
    example = Example(" ".join(["red"] * 1200), source="data.jsonl:7")
    with pytest.raises(DataError, match=r"data.jsonl:7: prompt is \d+ tokens, longer than the model's context of 1024"):
        extract(loaded, [example], progress=False)


def test_batches_group_similar_token_counts(loaded_model):
    """Items are batched by token count, not character count (less padding), and come back in input order."""
    loaded = loaded_model("qwen2")
    # Character order interleaves the two kinds; token order separates them ("red " is ~2 tokens, "x" is 1 per char).
    examples = [Example("red " * 9), Example("x" * 38), Example("red " * 10), Example("z" * 42)]
    tokens = [len(loaded.tokenizer(loaded.render("{text}", e.text, 0), add_special_tokens=False)["input_ids"]) for e in examples]
    assert tokens[0] < tokens[2] < tokens[1] < tokens[3]  # the premise: characters and tokens disagree
    seen: list[tuple[int, int]] = []
    handle = loaded.model.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    try:
        batched = extract(loaded, examples, batch_size=2, progress=False).vectors
    finally:
        handle.remove()
    assert sorted(seen) == [(2, tokens[2]), (2, tokens[3])]  # short pair, long pair: the least padding possible
    single = extract(loaded, examples, batch_size=1, progress=False).vectors
    assert np.abs(batched - single).max() <= 1e-5


def test_the_progress_bar_is_drawn_on_a_terminal_only(loaded_model, text_task, monkeypatch):
    """A log file or a pipe gets no bar fragments (carriage returns, partial lines); a terminal gets the bar."""
    import fcntl
    import io
    import os
    import pty
    import select
    import struct
    import termios

    examples = load_examples(text_task[0])[:4]
    piped = io.StringIO()
    monkeypatch.setattr("sys.stderr", piped)
    extract(loaded_model("qwen2"), examples, batch_size=2)
    assert piped.getvalue() == ""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a new pty has 0 rows: tqdm shows nothing
    terminal = os.fdopen(follower, "w")
    monkeypatch.setattr("sys.stderr", terminal)
    extract(loaded_model("qwen2"), examples, batch_size=2)
    terminal.flush()
    ready, _, _ = select.select([leader], [], [], 5)  # read before closing (a closed pty reads as EIO), never block
    drawn = os.read(leader, 1 << 16).decode(errors="replace") if ready else ""
    terminal.close()
    os.close(leader)
    assert "extracting" in drawn
