"""Every supported family through the same tests: batched extraction equals one item at a time (left and right
padding), and the command-line flow build -> inspect -> classify -> eval on its tiny random-weight fixture."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open

from savpack.cli import main
from savpack.data import Example, load_examples
from savpack.extract import extract
from savpack.media import load_media
from savpack.pipeline import held_out
from savpack_runtime import Pack

from conftest import ALL_FAMILIES, IMAGE_FIXTURES, task_for

TOLERANCE = 1e-5
FAMILY_OF_FIXTURE = {"qwen2": "causal_lm", "llama": "causal_lm", "gemma3_text": "causal_lm"}  # the other fixtures are named as their family
# Questions of different lengths, so a batch needs padding even where every image gives the same number of tokens.
QUESTIONS = [
    "What colour is this picture?",
    "Is it red?",
    "Describe the colour of the big picture: is it red, green or blue?",
    "colour",
    "Which one is it: red, green or blue? Answer with one word please.",
]


def varied_examples(name: str, colour_task) -> list[Example]:
    """Five items of different token lengths (and image sizes, for image-text families)."""
    if name not in IMAGE_FIXTURES:
        return [Example(text=f"the {question.lower()}", label="x", source=f"item {i}") for i, question in enumerate(QUESTIONS)]
    pictures = load_examples(colour_task[0])
    return [Example(text=question, images=pictures[3 * i].images, label=pictures[3 * i].label, source=f"item {i}")
            for i, question in enumerate(QUESTIONS)]


def attention_mask(loaded, examples: list[Example]):
    rendered = [loaded.render("{text}", example.text, len(example.images)) for example in examples]
    return loaded.encode(rendered, [load_media(example) for example in examples])["attention_mask"]


def batched_and_single(loaded, examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
    batched = extract(loaded, examples, batch_size=len(examples), progress=False).vectors
    single = extract(loaded, examples, batch_size=1, progress=False).vectors
    return batched, single


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_batched_equals_single(name, side, loaded_model, colour_task, monkeypatch):
    loaded = loaded_model(name)
    monkeypatch.setattr(loaded.tokenizer, "padding_side", side)
    examples = varied_examples(name, colour_task)
    mask = attention_mask(loaded, examples)
    padded_column = mask[:, 0] if side == "left" else mask[:, -1]
    assert (padded_column == 0).any(), "the batch must hold padding on the tested side"

    batched, single = batched_and_single(loaded, examples)
    assert batched.shape == (len(examples), *loaded.grid)
    assert np.abs(single).max() > 0.01  # real activations, not zeros
    assert np.abs(batched - single).max() <= TOLERANCE


def test_gpt2_left_padding_is_exact_only_with_positions_from_the_mask(loaded_model, colour_task, monkeypatch):
    """The family's positions_from_mask is what makes left padding exact for learned absolute positions."""
    loaded = loaded_model("gpt2")
    examples = varied_examples("gpt2", colour_task)
    monkeypatch.setattr(loaded, "family", dataclasses.replace(loaded.family, positions_from_mask=False))
    batched, single = batched_and_single(loaded, examples)
    assert np.abs(batched - single).max() > 1e-3


def test_gemma3_token_type_ids_change_the_activations(loaded_model, colour_task, monkeypatch):
    """Dropping token_type_ids runs without error and silently changes what the heads see: the family must pass it."""
    loaded = loaded_model("gemma3")
    examples = varied_examples("gemma3", colour_task)[:2]
    with_types = extract(loaded, examples, progress=False).vectors
    inputs = tuple(name for name in loaded.family.forward_inputs if name != "token_type_ids")
    monkeypatch.setattr(loaded, "family", dataclasses.replace(loaded.family, forward_inputs=inputs))
    without_types = extract(loaded, examples, progress=False).vectors
    assert np.abs(with_types - without_types).max() > 1e-4


def test_gpt2_mlp_c_proj_is_not_taken_for_attention(loaded_model):
    loaded = loaded_model("gpt2")
    blocks = loaded.model.transformer.h
    assert loaded.attention_outputs == [block.attn.c_proj for block in blocks]


def hand_vote(vectors: np.ndarray, heads: np.ndarray, centroids: np.ndarray) -> list[int]:
    """The pack's vote written out from docs/format.md section 5, one item and one head at a time: vectors (N, L, H, D)
    of every head, centroids (k, C, D). Each head picks its most cosine-similar class (lower index on ties); most
    votes win, ties to the larger summed cosine, then the lower class index."""
    def cosine(a, b):
        return float(a @ b) / (max(float(np.linalg.norm(a)), 1e-8) * max(float(np.linalg.norm(b)), 1e-8))

    winners = []
    for item in vectors.astype(np.float64):
        classes = centroids.shape[1]
        votes, sums = [0] * classes, [0.0] * classes
        for position, (layer, head) in enumerate(heads.tolist()):
            similarity = [cosine(item[layer, head], centroids[position, c].astype(np.float64)) for c in range(classes)]
            votes[similarity.index(max(similarity))] += 1
            sums = [total + value for total, value in zip(sums, similarity)]
        tied = [c for c in range(classes) if votes[c] == max(votes)]
        winners.append(max(tied, key=lambda c: (sums[c], -c)))
    return winners


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_cli_build_inspect_classify_eval(name, model_dir, loaded_model, colour_task, text_task, tmp_path):
    model = str(model_dir(name))
    train, test = task_for(name, colour_task, text_task)
    pack = tmp_path / "pack.safetensors"
    runner = CliRunner()
    common = ["--model", model, "--device", "cpu", "--batch-size", "4"]

    built = runner.invoke(main, ["build", *common, "--data", str(train), "--out", str(pack), "--k", "5", "--json"])
    assert built.exit_code == 0, built.output
    assert pack.is_file()

    # inspect against the file read by the safetensors library itself, not by savpack's reader
    inspected = runner.invoke(main, ["inspect", str(pack), "--json"])
    assert inspected.exit_code == 0, inspected.output
    summary = json.loads(inspected.stdout)
    with safe_open(str(pack), framework="numpy") as stored:
        metadata, heads = stored.metadata(), stored.get_tensor("heads")
        centroids = stored.get_tensor("centroids")
    assert summary["sha256"] == json.loads(built.stdout)["sha256"] == hashlib.sha256(pack.read_bytes()).hexdigest()
    assert [[head["layer"], head["head"]] for head in summary["heads"]] == heads.tolist() and len(heads) == 5
    assert summary["labels"] == json.loads(metadata["savpack.labels"]) == sorted({e.label for e in load_examples(train)})
    assert summary["model"] == json.loads(metadata["savpack.model"])
    assert summary["model"]["family"] == FAMILY_OF_FIXTURE.get(name, name)
    assert summary["model"]["grid"] == list(model_dir_grid(model))

    classified = runner.invoke(main, ["classify", "--pack", str(pack), *common, "--data", str(test)])
    assert classified.exit_code == 0, classified.output
    records = {record["source"]: record for record in map(json.loads, classified.stdout.splitlines())}
    test_examples = load_examples(test)
    assert list(records) == [example.source for example in test_examples]
    assert all(sum(record["votes"].values()) == 5 for record in records.values())

    # The oracle: every head from a full forward (no early stop) and the vote written out by hand.
    built_pack = Pack.load(pack)
    every_head = extract(loaded_model(name), test_examples, built_pack.prompt["template"], progress=False,
                         token_position=built_pack.token_position).vectors
    expected = [summary["labels"][c] for c in hand_vote(every_head, heads, centroids)]
    assert [records[example.source]["label"] for example in test_examples] == expected

    evaluated = runner.invoke(main, ["eval", "--pack", str(pack), *common, "--data", str(test), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    kept, skipped = held_out(built_pack, test_examples)  # eval skips items the pack was built from
    assert (report["examples"], report["skipped_training_examples"]) == (len(kept), skipped)
    by_source = dict(zip((example.source for example in test_examples), expected))
    assert report["accuracy"] == pytest.approx(np.mean([by_source[example.source] == example.label for example in kept]))


def model_dir_grid(model: str) -> tuple[int, int, int]:
    from transformers import AutoConfig

    from savpack.model_files import check_text_config

    return check_text_config(AutoConfig.from_pretrained(model).get_text_config(decoder=True), model)
