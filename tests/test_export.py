"""The export: forwards equal to hooks on the real model, host planning equal to transformers' rules, validation that
catches a wrong graph, bundles written atomically, `savpack export` on the command line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from savpack.cli import main
from savpack.data import load_examples
from savpack.errors import ExportError
from savpack.export import onnx_graph
from savpack.export.bundle import export_bundle, union_heads
from savpack.export.forward import build_graph_module
from savpack.export.validate import ExportValidationError, encode_examples, make_examples, validate_graph
from savpack.extract import extract
from savpack.models import load_model
from savpack.pipeline import extract_activations, pack_from_activations, training_examples
from savpack_runtime import Classifier, graph_inputs
from savpack_runtime.bundle import Bundle
from savpack_runtime.errors import ModelMismatchError, OutputPathError
from savpack_runtime.items import Example
from savpack_runtime.pack import Pack
from savpack_runtime.session import GraphSession

from conftest import task_for

HEADS = np.array([[1, 3], [0, 5], [3, 2], [3, 7], [2, 0], [0, 1]])
# Fixtures of 4 heads (gemma3_text: a global layer 2 and sliding ones 0, 1, 3; bert has 3 layers), layer 3 deepest.
GEMMA3_HEADS = np.array([[1, 3], [0, 2], [3, 1], [2, 0], [3, 3], [0, 1]])
FOUR_HEADS = ("gemma3_text", "gemma3", "gemma", "gemma2", "qwen3_vl")
BERT_HEADS = np.array([[1, 3], [0, 2], [2, 1], [2, 0], [0, 1]])


def heads_for(name: str) -> np.ndarray:
    return BERT_HEADS if name == "bert" else GEMMA3_HEADS if name in FOUR_HEADS else HEADS


@pytest.fixture(scope="module")
def packs(loaded_model, colour_task, text_task):
    """packs(name) -> [paper pack k=5, loo pack k=4] built on the fixture's task."""
    made = {}

    def get(name):
        if name not in made:
            train, _ = task_for(name, colour_task, text_task)
            activations = extract_activations(loaded_model(name), load_examples(train), "Say: {text}", progress=False)
            made[name] = [pack_from_activations(activations, k=5, name=f"{name}-paper"),
                          pack_from_activations(activations, k=4, scoring="loo", name=f"{name}-loo")]
        return made[name]

    return get


def _graph_vectors(graph, loaded, examples, template="{text}"):
    feed = graph_inputs.plan(graph.kind, graph.plan_config, encode_examples(loaded, examples, template))
    with torch.no_grad():
        return graph.module(*[torch.from_numpy(np.asarray(feed[name])) for name in graph.input_names]).numpy()


@pytest.mark.parametrize("name, image_count", [
    ("qwen2_vl", 1), ("llava_onevision", 1), ("qwen2", 0), ("llama", 0), ("qwen2_vl", 0), ("qwen2_5_vl", 1), ("llava", 1),
    ("gemma3_text", 0), ("qwen3", 0), ("gemma", 0), ("gemma2", 0), ("gpt2", 0), ("gemma3", 1), ("gemma3", 0),
    ("idefics3", 1), ("smolvlm", 1), ("qwen3_vl", 1), ("qwen3_vl", 0)])
@pytest.mark.parametrize("selected_only", [False, True])
def test_export_forward_equals_hooks_on_the_full_model(loaded_model, tmp_path, name, image_count, selected_only):
    loaded = loaded_model(name)
    examples = make_examples(3, image_count, [(200, 70), (60, 180), (98, 98)], tmp_path, seed=5,
                             extra_image_item=1 if image_count else None)
    graph = build_graph_module(loaded, heads_for(name), image_count, selected_only)
    expected = extract(loaded, examples, heads=heads_for(name), progress=False).vectors
    assert np.abs(_graph_vectors(graph, loaded, examples) - expected).max() < 1e-5


@pytest.mark.parametrize("token_position", ["first", "last"])
def test_bert_export_reads_the_packs_token(loaded_model, tmp_path, token_position):
    """[CLS] or [SEP] as the pack says, with right padding (mixed lengths); the other token gives other vectors."""
    loaded = loaded_model("bert")
    examples = make_examples(3, 0, [], tmp_path, seed=5)
    graph = build_graph_module(loaded, BERT_HEADS, 0, token_position=token_position)
    assert graph.kind == graph_inputs.BERT and graph.plan_config == {"token_position": token_position}
    vectors = _graph_vectors(graph, loaded, examples)
    for position in ("first", "last"):
        expected = extract(loaded, examples, heads=BERT_HEADS, progress=False, token_position=position).vectors
        assert (np.abs(vectors - expected).max() < 1e-5) == (position == token_position)
    with pytest.raises(ExportError, match="reads heads at"):
        build_graph_module(loaded_model("qwen2"), HEADS, 0, token_position="first")


def test_qwen2_5_vl_window_attention_is_reproduced(loaded_model, tmp_path):
    """The vision tower's features equal transformers' (its own forward, windows from get_vision_window_index) on
    images of 3x3, 2x6 and 3x5 merged units, which span full and partial windows of 2x2 units; attending over whole
    images in the window blocks instead (Qwen2-VL's way) gives other features."""
    loaded = loaded_model("qwen2_5_vl")
    examples = make_examples(3, 1, [(84, 84), (60, 180), (84, 140)], tmp_path, seed=9, extra_image_item=1)
    graph = build_graph_module(loaded, HEADS, 1)
    encoded = encode_examples(loaded, examples, "{text}")
    feed = graph_inputs.plan(graph.kind, graph.plan_config, encoded)
    assert len(feed["window_index"]) > len(feed["patch_index"]) and not feed["window_mask"].all()
    with torch.no_grad():
        expected = loaded.model.model.visual(torch.from_numpy(encoded["pixel_values"]),
                                             grid_thw=torch.from_numpy(encoded["image_grid_thw"])).pooler_output.numpy()

    def features() -> np.ndarray:  # the graph's padded per-image rows, real rows only, image after image
        names = ("pixel_values", "patch_index", "patch_mask", "patch_positions", "window_index", "window_mask", "window_inverse")
        with torch.no_grad():
            rows = graph.module.image_features(*[torch.from_numpy(np.asarray(feed[name])) for name in names]).numpy()
        real = feed["patch_mask"][:, ::4].reshape(-1)  # one row per merge x merge patches
        return rows[real]

    scale = np.abs(expected).max()
    assert np.abs(features() - expected).max() < 1e-5 * scale
    graph.module.full_attention_blocks = set(range(len(graph.module.visual.blocks)))
    assert np.abs(features() - expected).max() > 1e-3 * scale  # random tiny weights: attention moves features little


def test_gemma3_sliding_window_is_reproduced(loaded_model, tmp_path):
    """Prompts longer than the fixture's window of 6: sliding layers see only the last 6 tokens, and without the
    window (every layer global) the vectors differ."""
    loaded = loaded_model("gemma3_text")
    examples = make_examples(3, 0, [], tmp_path, seed=5)
    graph = build_graph_module(loaded, GEMMA3_HEADS, 0)
    assert graph.module.decoder.windows == [6, 6, None, 6]
    expected = extract(loaded, examples, heads=GEMMA3_HEADS, progress=False).vectors
    assert np.abs(_graph_vectors(graph, loaded, examples) - expected).max() < 1e-5
    graph.module.decoder.windows = [None] * 4
    assert np.abs(_graph_vectors(graph, loaded, examples) - expected).max() > 1e-3


def _switched_off(loaded, graph, examples, switch) -> float:
    """The largest difference from the model once `switch(graph.module)` turned a family rule off."""
    expected = extract(loaded, examples, heads=GEMMA3_HEADS, progress=False).vectors
    assert np.abs(_graph_vectors(graph, loaded, examples) - expected).max() < 1e-5
    switch(graph.module)
    return float(np.abs(_graph_vectors(graph, loaded, examples) - expected).max())


def test_gemma2_soft_capping_is_reproduced(loaded_model, tmp_path):
    loaded = loaded_model("gemma2")
    graph = build_graph_module(loaded, GEMMA3_HEADS, 0)
    assert graph.module.decoder.softcap == 0.02 and graph.module.decoder.windows == [6, None, 6, None]
    off = _switched_off(loaded, graph, make_examples(3, 0, [], tmp_path, seed=5), lambda module: setattr(module.decoder, "softcap", None))
    assert off > 1e-3


def test_gemma3_image_tokens_attend_to_each_other(loaded_model, tmp_path):
    """Gemma 3's image tokens see their whole image (both directions); a causal mask over them gives other vectors."""
    loaded = loaded_model("gemma3")
    graph = build_graph_module(loaded, GEMMA3_HEADS, 1)
    examples = make_examples(3, 1, [(200, 70), (60, 180), (98, 98)], tmp_path, seed=5, extra_image_item=1)
    decoder = graph.module.decoder
    honest = decoder.forward
    causal = lambda hidden, mask, tables, image_blocks=None, additions=None: honest(hidden, mask, tables)  # noqa: E731
    assert _switched_off(loaded, graph, examples, lambda module: setattr(decoder, "forward", causal)) > 1e-3


def test_qwen3_vl_deepstack_and_position_embeddings_are_reproduced(loaded_model, tmp_path):
    loaded = loaded_model("qwen3_vl")
    examples = make_examples(3, 1, [(200, 70), (60, 180), (98, 98)], tmp_path, seed=5, extra_image_item=1)
    graph = build_graph_module(loaded, GEMMA3_HEADS, 1)
    assert graph.module.deepstack_blocks == [0]
    assert _switched_off(loaded, graph, examples, lambda module: setattr(module, "deepstack_blocks", [])) > 1e-3
    graph = build_graph_module(loaded, GEMMA3_HEADS, 1)
    zero_table = lambda module: torch.nn.init.zeros_(module.visual.pos_embed.weight)  # noqa: E731
    table = loaded.model.model.visual.pos_embed.weight.detach().clone()
    try:
        assert _switched_off(loaded, graph, examples, zero_table) > 1e-3
    finally:
        loaded.model.model.visual.pos_embed.weight.data.copy_(table)


def test_planned_qwen3_vl_position_taps_equal_transformers():
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    for grid in [(1, 4, 4), (1, 8, 6), (1, 6, 10), (2, 4, 8), (1, 2, 2), (1, 22, 34), (1, 48, 48)]:
        for side in (8, 48):
            index, weight = get_vision_interpolation_indices_and_weights(
                torch.tensor([grid]), num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=2)
            planned_index, planned_weight = graph_inputs.position_embedding_taps(*grid, 2, side)
            assert np.array_equal(planned_index, index.numpy()), (grid, side)
            assert np.array_equal(planned_weight, weight.numpy()), (grid, side)


@pytest.mark.parametrize("frame, grid_side", [(32, 4), (48, 4), (24, 4), (512, 32), (364, 26), (384, 27)])
def test_idefics3_position_ids_equal_transformers(loaded_model, frame, grid_side):
    """Frames of another size than the tower's image_size bucket their patches into the learned grid; the graph's
    constant ids equal Idefics3VisionEmbeddings' for a whole frame."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    from savpack.export.forward import _idefics3_position_ids

    config = loaded_model("idefics3").model.config.vision_config
    config = type(config)(**{**config.to_dict(), "image_size": grid_side * config.patch_size})
    embeddings = Idefics3VisionEmbeddings(config).eval()
    side = frame // config.patch_size
    pixels = torch.zeros(1, 3, side * config.patch_size, side * config.patch_size)
    with torch.no_grad():
        expected = embeddings(pixels, torch.ones(1, side, side, dtype=torch.bool))
        patches = embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
        found = patches + embeddings.position_embedding(_idefics3_position_ids(side, grid_side))[None]
    assert torch.equal(found, expected)


def test_planned_windows_equal_transformers():
    from transformers.vision_utils import get_vision_window_index

    # (t, h, w) patch grids; Qwen2.5-VL's real window (112 px, patch 14, merge 2: 4x4 units) and the fixture's (2x2).
    grids = [(1, 4, 4), (1, 8, 6), (1, 6, 10), (2, 4, 8), (1, 2, 2), (1, 22, 34), (1, 16, 16)]
    for window_size in (56, 112):
        for grid in grids:
            index, boundaries = get_vision_window_index(torch.tensor([grid]), 2, window_size, 14)
            windows = graph_inputs.vision_windows(*grid, 2, window_size // 2 // 14)
            patches = (index[:, None] * 4 + torch.arange(4)).reshape(-1).numpy()  # units -> their 4 patches
            assert np.array_equal(np.concatenate(windows), patches), grid
            assert [len(window) for window in windows] == np.diff(boundaries.numpy()).tolist(), grid


def test_llava_anyres_resize_path_equals_hooks(model_dir, tmp_path):
    """anyres_max_1 makes transformers shrink the tile feature map bilinearly: the planned gather must follow."""
    loaded = load_model(str(model_dir("llava_onevision")), device="cpu")
    loaded.model.config.vision_aspect_ratio = "anyres_max_1"
    loaded.processor.vision_aspect_ratio = "anyres_max_1"
    examples = make_examples(2, 1, [(150, 60), (70, 130)], tmp_path, seed=6)
    graph = build_graph_module(loaded, HEADS, 1)
    encoded = encode_examples(loaded, examples, "{text}")
    weights = graph_inputs.plan(graph.kind, graph.plan_config, encoded)["image_token_weight"]
    assert ((weights > 0) & (weights < 1)).any()  # the bilinear path really runs
    expected = extract(loaded, examples, heads=HEADS, progress=False).vectors
    assert np.abs(_graph_vectors(graph, loaded, examples) - expected).max() < 1e-5


def test_planned_positions_equal_transformers(loaded_model, tmp_path):
    from transformers.vision_utils import get_vision_position_ids

    loaded = loaded_model("qwen2_vl")
    examples = make_examples(3, 1, [(200, 70), (60, 180), (98, 98), (150, 150)], tmp_path, seed=8, extra_image_item=0)
    encoded = encode_examples(loaded, examples, "{text}")
    merge = loaded.model.config.vision_config.spatial_merge_size
    grid = encoded["image_grid_thw"]
    tensors = {key: torch.from_numpy(value) for key, value in encoded.items()}
    expected, _ = loaded.model.model.get_rope_index(tensors["input_ids"], tensors["mm_token_type_ids"],
                                                    tensors["image_grid_thw"], attention_mask=tensors["attention_mask"])
    planned = graph_inputs.mrope_position_ids(encoded["mm_token_type_ids"], encoded["attention_mask"], grid, merge)
    assert np.array_equal(planned, expected.numpy())
    vision = np.concatenate([graph_inputs.vision_rotary_positions(*row, merge) for row in grid.tolist()])
    assert np.array_equal(vision, get_vision_position_ids(tensors["image_grid_thw"], merge).numpy())


def test_union_of_heads_keeps_each_packs_order(packs):
    first, second = packs("qwen2")
    heads, positions = union_heads([first, second])
    assert len({tuple(h) for h in heads.tolist()}) == len(heads)
    for pack, position in zip((first, second), positions):
        assert np.array_equal(heads[position], pack.heads)
    assert np.array_equal(positions[0], np.arange(first.k))


def test_bundle_fp16_selected_heads_two_packs(loaded_model, packs, tmp_path):
    loaded = loaded_model("qwen2_vl")
    result = export_bundle(loaded, packs("qwen2_vl"), tmp_path / "bundle", fp16=True, selected_heads_only=True)
    bundle = Bundle.load(result.folder, check_weights=True)
    assert bundle.graph["weights"] == "float16" and bundle.graph["selected_heads_only"]
    assert [entry.name for entry in bundle.packs] == ["qwen2_vl-paper", "qwen2_vl-loo"]
    assert 1e-7 < result.validation.max_difference < 2e-2  # float16 weights round, within the fp16 tolerance
    float32 = export_bundle(loaded, packs("qwen2_vl"), tmp_path / "float32", selected_heads_only=True)
    assert result.sizes["graph.onnx.data"] < 0.6 * float32.sizes["graph.onnx.data"]
    assert float32.validation.max_difference < 1e-5
    assert sorted(result.sizes) == sorted(["bundle.json", "graph.onnx", "graph.onnx.data", "packs/qwen2_vl-loo.safetensors",
                                           "packs/qwen2_vl-paper.safetensors", "preprocess.json", "tokenizer.json"])


def test_validation_catches_a_wrong_graph(loaded_model, packs, tmp_path):
    """A graph whose weights differ slightly from the model's, and one returning other heads: both refused, every
    mismatch listed."""
    import onnx
    from onnx import numpy_helper

    loaded = loaded_model("qwen2")
    pack = packs("qwen2")[0]
    result = export_bundle(loaded, [pack], tmp_path / "bundle")
    kind, plan = result.info["graph"]["kind"], result.info["graph"]["plan"]
    heads = np.asarray(result.info["graph"]["heads"])

    model = onnx.load(str(result.folder / "graph.onnx"))
    target = next(t for t in model.graph.initializer if "embed_tokens" in t.name)
    values = numpy_helper.to_array(target).copy()
    values[:, :4] += 0.05
    target.CopyFrom(numpy_helper.from_array(values, target.name))
    onnx.save_model(model, str(tmp_path / "wrong.onnx"), save_as_external_data=True, location="wrong.onnx.data")
    with pytest.raises(ExportValidationError) as caught:
        validate_graph(GraphSession(tmp_path / "wrong.onnx"), loaded, kind, plan, heads, pack.prompt["template"], 0)
    batches = {mismatch.batch for mismatch in caught.value.mismatches}
    assert batches == {"batch of 1", "mixed batch of 4"}
    assert len(caught.value.mismatches) >= len(heads)
    assert "disagrees with the model" in str(caught.value) and "head [" in str(caught.value)

    right_graph = GraphSession(result.folder / "graph.onnx")
    with pytest.raises(ExportValidationError):
        validate_graph(right_graph, loaded, kind, plan, heads[::-1], pack.prompt["template"], 0)
    validate_graph(right_graph, loaded, kind, plan, heads, pack.prompt["template"], 0)


def test_traced_graph_is_validated_on_other_shapes(loaded_model, tmp_path):
    """A forward that bakes the example's length in passes on its example and fails on fresh inputs."""
    loaded = loaded_model("qwen2")
    graph = build_graph_module(loaded, HEADS, 0)
    example = make_examples(2, 0, [], tmp_path, seed=7)
    feed = graph_inputs.plan(graph.kind, graph.plan_config, encode_examples(loaded, example, "{text}"))
    baked_length = int(feed["input_ids"].shape[1])
    honest = graph.module.forward

    def baked(input_ids, attention_mask):  # the tracer records this slice with the example's constant
        return honest(input_ids[:, -baked_length:], attention_mask[:, -baked_length:])

    graph.module.forward = baked
    model = onnx_graph.trace_to_onnx(graph, feed, tmp_path)
    onnx_graph.save(model, tmp_path / "baked.onnx", tmp_path)
    session = GraphSession(tmp_path / "baked.onnx")
    with pytest.raises(ExportValidationError) as caught:
        validate_graph(session, loaded, graph.kind, graph.plan_config, HEADS, "{text}", 0)
    assert caught.value.mismatches


def _weights_graph():
    """A small ONNX graph with a large weight, a medium one and one under INLINE_BYTES, all held inline."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(size=(64, 32)).astype(np.float32), "matrix"),  # 8 KB
               numpy_helper.from_array(rng.normal(size=(32,)).astype(np.float32), "bias"),  # 128 bytes: stays inline
               numpy_helper.from_array(rng.normal(size=(300,)).astype(np.float32), "extra")]  # 1.2 KB
    nodes = [helper.make_node("MatMul", ["x", "matrix"], ["h"]), helper.make_node("Add", ["h", "bias"], ["y"]),
             helper.make_node("Identity", ["extra"], ["z"])]
    graph = helper.make_graph(nodes, "weights", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [300])], initializer=weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_graph.OPSET)])


def test_save_streams_external_weights_into_the_same_bytes(tmp_path):
    """A graph over 2 GB leaves the exporter with its weights in files (one per tensor) and is loaded without them:
    save copies them into the one weights file, writing the bytes onnx.save_model writes for the graph in memory."""
    import onnx
    import onnxruntime

    from savpack_runtime.bundle import GRAPH_DATA_FILE

    for folder in ("reference", "traced", "inline", "streamed"):
        (tmp_path / folder).mkdir()
    onnx.save_model(_weights_graph(), str(tmp_path / "reference" / "graph.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=GRAPH_DATA_FILE, size_threshold=onnx_graph.INLINE_BYTES)
    onnx.save_model(_weights_graph(), str(tmp_path / "traced" / "traced.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)  # as the exporters write large graphs
    traced = onnx.load(str(tmp_path / "traced" / "traced.onnx"), load_external_data=False)
    assert all(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in traced.graph.initializer)

    onnx_graph.save(traced, tmp_path / "streamed" / "graph.onnx", tmp_path / "traced")
    onnx_graph.save(_weights_graph(), tmp_path / "inline" / "graph.onnx", tmp_path / "traced")
    for folder in ("streamed", "inline"):
        for name in ("graph.onnx", GRAPH_DATA_FILE):
            assert (tmp_path / folder / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), (folder, name)
    saved = onnx.load(str(tmp_path / "streamed" / "graph.onnx"), load_external_data=False)
    inline = {tensor.name for tensor in saved.graph.initializer if tensor.data_location != onnx.TensorProto.EXTERNAL}
    assert inline == {"bias"}

    x = np.ones((2, 64), np.float32)
    expected = onnxruntime.InferenceSession(str(tmp_path / "reference" / "graph.onnx")).run(None, {"x": x})
    found = onnxruntime.InferenceSession(str(tmp_path / "streamed" / "graph.onnx")).run(None, {"x": x})
    assert all(np.array_equal(a, b) for a, b in zip(found, expected))


def test_save_checks_the_written_graph(tmp_path):
    from onnx import helper

    model = _weights_graph()
    model.graph.node.insert(0, helper.make_node("Relu", ["undefined"], ["unused"]))
    with pytest.raises(ExportError, match="not valid ONNX"):
        onnx_graph.save(model, tmp_path / "graph.onnx", tmp_path)


def test_export_refuses_mismatched_packs_and_models(loaded_model, packs, tmp_path):
    qwen2_vl_pack, qwen2_pack = packs("qwen2_vl")[0], packs("qwen2")[0]
    with pytest.raises(ModelMismatchError):
        export_bundle(loaded_model("qwen2"), [qwen2_vl_pack], tmp_path / "a")
    with pytest.raises(ModelMismatchError, match="another model"):
        export_bundle(loaded_model("qwen2"), [qwen2_pack, qwen2_vl_pack], tmp_path / "b")
    other_prompt = qwen2_pack.replace(prompt={**qwen2_pack.prompt, "template": "x {text}", "rendered": "x {text}"}, name="other")
    with pytest.raises(ExportError, match="share one prompt"):
        export_bundle(loaded_model("qwen2"), [qwen2_pack, other_prompt], tmp_path / "c")
    assert not any(tmp_path.iterdir())  # nothing left behind


def test_export_refuses_unsupported_language_models(loaded_model):
    loaded = loaded_model("qwen2")
    config = loaded.model.config
    original = config.model_type
    try:
        config.model_type = "phi3"
        with pytest.raises(ExportError, match="'phi3' is not exportable"):
            build_graph_module(loaded, HEADS, 0)
    finally:
        config.model_type = original


def test_savpack_export_command(model_dir, packs, tmp_path):
    first, second = packs("qwen2")
    paths = [first.save(tmp_path / "a.safetensors"), second.save(tmp_path / "b.safetensors")]
    out = tmp_path / "bundle"
    args = ["export", "--pack", str(paths[0]), "--pack", str(paths[1]), "--model", str(model_dir("qwen2")), "--out", str(out)]
    umask = os.umask(0o022)
    try:
        done = CliRunner().invoke(main, args + ["--json"])
    finally:
        os.umask(umask)
    assert done.exit_code == 0, done.output
    assert out.stat().st_mode & 0o777 == 0o755  # the umask's permissions, not a staging folder's 0700
    summary = json.loads(done.stdout)
    assert summary["packs"] == ["qwen2-paper", "qwen2-loo"] and summary["validation"]["max_difference"] < 1e-5
    graph_before = (out / "graph.onnx").read_bytes()

    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "exists; pass --force" in refused.output
    assert (out / "graph.onnx").read_bytes() == graph_before
    replaced = CliRunner().invoke(main, args[:3] + ["--model", str(model_dir("qwen2")), "--out", str(out), "--force"])
    assert replaced.exit_code == 0, replaced.output
    assert len(Bundle.load(out).packs) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "bundle"]

    wrong = CliRunner().invoke(main, ["export", "--pack", str(paths[0]), "--model", str(model_dir("llama")), "--out", str(tmp_path / "x")])
    assert wrong.exit_code == 1 and "pack was built for" in wrong.output and "Traceback" not in wrong.output
    assert not (tmp_path / "x").exists()


def test_export_needs_float32_on_cpu(model_dir, packs, tmp_path):
    loaded = load_model(str(model_dir("qwen2")), device="cpu", dtype="bfloat16")
    with pytest.raises(ExportError, match="float32 on the CPU"):
        export_bundle(loaded, packs("qwen2"), tmp_path / "bundle")


def test_output_path_errors(loaded_model, packs, tmp_path):
    with pytest.raises(OutputPathError, match="does not exist"):
        export_bundle(loaded_model("qwen2"), packs("qwen2"), tmp_path / "missing" / "bundle")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="not a folder"):
        export_bundle(loaded_model("qwen2"), packs("qwen2"), tmp_path / "file", force=True)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SAVPACK_SLOW_TESTS"), reason="the dynamo exporter takes ~1 min per graph; SAVPACK_SLOW_TESTS=1 runs it")
@pytest.mark.parametrize("name", ["qwen2_vl", "llava_onevision", "qwen2", "qwen2_5_vl", "llava", "gemma3_text", "bert",
                                  "gpt2", "gemma3", "smolvlm", "qwen3_vl"])
def test_dynamo_exporter(loaded_model, packs, tmp_path, name):
    result = export_bundle(loaded_model(name), packs(name), tmp_path / "bundle", exporter="dynamo", selected_heads_only=True)
    assert result.validation.max_difference < 1e-5
    assert result.info["created_by"]["exporter"] == "dynamo"


SCORING_CASES = {  # (vote method, savpack.scoring classifier or None for a format-1 pack)
    "majority, format 1": ("majority", None), "cosine, format 1": ("cosine", None),
    "weighted, format 1": ("weighted", None), "majority, calibrated": ("majority", "vote"),
    "probability vote": ("probability", "vote"), "probe": ("majority", "probe"),
}


def _scoring_pack(vote: str, classifier: str | None, rng: np.random.Generator, k: int = 6, classes: int = 3,
                  d: int = 8) -> Pack:
    """A pack of random centroids with the given vote and scoring model (a probe's weights random too)."""
    centroids = rng.normal(size=(k, classes, d)).astype(np.float32)
    scoring, weight, bias = None, None, None
    if classifier is not None:
        # A low temperature and a sharpness below 1: the regime where float32 arithmetic drifts from float64 by 1e-6.
        scoring = {"classifier": classifier, "temperature": 0.5 if classifier == "probe" else 0.01,
                   "sharpness": 1.0 if classifier == "probe" else 0.6, "fitted_on": "cross-validation"}
    if classifier == "probe":
        weight = rng.normal(size=(classes, k * d)).astype(np.float32)
        bias = rng.normal(size=classes).astype(np.float32)
    return Pack(heads=np.stack([np.arange(k), np.zeros(k)], axis=1).astype(np.int32), centroids=centroids,
                # Scores whose float sums tie in some combinations (0.25 + 0.5 = 0.75) and not in others.
                head_scores=np.array([0.75, 0.5, 0.25, 0.5, 0.625, 0.3], np.float32)[:k],
                class_counts=np.ones(classes, np.int32), all_head_scores=np.ones((k, 1), np.float32),
                labels=tuple("abcdefgh"[:classes]),
                model={"id": "m", "revision": "r", "family": "qwen2", "grid": [k, 1, d], "fingerprint": "f"},
                prompt={"template": "{text}", "rendered": "{text}", "image_count": 0, "chat_template_sha256": None},
                selection={"k": k, "vote": vote}, scoring=scoring, probe_weight=weight, probe_bias=bias)


@pytest.mark.parametrize("case", list(SCORING_CASES))
def test_the_scores_inside_the_graph_equal_the_numpy_reference(case, tmp_path):
    """PackScores exported alone, on random vectors and on vectors made to tie: cosines, votes, probabilities (1e-6)
    and the label (tie-breaks included) equal savpack_runtime's numpy vote and scoring on the same head vectors."""
    import onnxruntime

    from savpack.export.scores import PackScores
    from savpack_runtime.graph_inputs import SCORE_ROLES
    from savpack_runtime.scoring import pack_decision
    from savpack_runtime.vote import cosine_to_centroids

    vote, classifier = SCORING_CASES[case]
    rng = np.random.default_rng(3)
    pack = _scoring_pack(vote, classifier, rng)
    k, classes, d = pack.centroids.shape
    positions = np.array([5, 0, 3, 1, 2, 4])  # the pack's heads sit in another order in the graph
    torch.onnx.export(PackScores(pack, positions).eval(), (torch.zeros(2, k, d),), str(tmp_path / "scores.onnx"),
                      input_names=["head_vectors"], output_names=list(SCORE_ROLES),
                      dynamic_axes={"head_vectors": {0: "batch"}}, opset_version=onnx_graph.OPSET, dynamo=False)
    session = onnxruntime.InferenceSession(str(tmp_path / "scores.onnx"))
    vectors = rng.normal(size=(300, k, d)).astype(np.float32)
    # Ties: items whose heads copy centroids so that two classes get 3 votes each (and a zero vector).
    for item in range(50):
        first, second = rng.choice(classes, 2, replace=False)
        for slot, head in enumerate(positions):
            vectors[item, head] = pack.centroids[slot, first if slot < 3 else second] * rng.uniform(0.5, 2)
    vectors[50] = 0.0
    outputs = dict(zip(SCORE_ROLES, session.run(None, {"head_vectors": vectors})))
    chosen = vectors[:, positions]
    assert np.abs(outputs["cosines"] - cosine_to_centroids(chosen, pack.centroids)).max() <= 1e-6
    # The numpy reference on the graph's cosines (the same inputs), as the runtime and the export's validation use it.
    reference = pack_decision(pack, chosen, similarities=outputs["cosines"])
    assert np.array_equal(outputs["votes"], reference.votes.votes)
    assert np.array_equal(outputs["prediction"], reference.predictions)
    assert outputs["probabilities"].dtype == np.float32
    assert np.abs(outputs["probabilities"] - reference.probabilities).max() <= 1e-6
    assert reference.calibrated == (classifier is not None)
    tied = (reference.votes.votes == reference.votes.votes.max(axis=1, keepdims=True)).sum(axis=1) > 1
    assert tied.sum() >= 50  # the tie-break really ran
    if vote == "weighted":  # the weighted tally decides otherwise than the head count somewhere
        assert not np.array_equal(outputs["prediction"], pack_decision(pack, chosen, method="majority").predictions)
    if classifier is not None:  # the probabilities are not the shares, and spread over (0, 1)
        assert np.abs(outputs["probabilities"] - reference.votes.shares).max() > 0.1
        assert 0.05 < np.median(outputs["probabilities"].max(axis=1)) < 0.999
    if classifier == "probe" or vote == "probability":  # the label is the probabilities' argmax, not the vote's
        probabilities = outputs["probabilities"]  # the label's is the top one (float32 ties aside: argmax in float64)
        assert np.array_equal(probabilities[np.arange(len(probabilities)), outputs["prediction"]], probabilities.max(axis=1))
        assert not np.array_equal(outputs["prediction"], pack_decision(pack, chosen, method="majority",
                                                                      similarities=outputs["cosines"]).votes.predictions)


def test_a_vote_method_the_graph_does_not_know_is_refused():
    from savpack.export.scores import PackScores

    pack = _scoring_pack("plurality", None, np.random.default_rng(0))
    with pytest.raises(ExportError, match="vote method 'plurality'"):
        PackScores(pack, np.arange(6))


def test_the_bundle_computes_every_packs_probabilities_in_the_graph(loaded_model, text_task, tmp_path, monkeypatch):
    """A probe pack, a calibrated vote pack deciding by probability and a format-1 pack in one bundle: the graph's
    probabilities equal savpack_runtime.scoring's on the graph's head vectors (1e-6), its prediction is each pack's
    label, bundle.json says which packs are calibrated, and the Classifier uses the graph's numbers (numpy's vote and
    probabilities are not called)."""
    from savpack_runtime import scoring

    loaded = loaded_model("qwen2")
    train, test = (load_examples(path) for path in text_task)
    activations = extract_activations(loaded, train, "Say: {text}", progress=False)
    probe = pack_from_activations(activations, k=5, classifier="probe", name="probe")
    by_probability = pack_from_activations(activations, k=4, vote="probability", classifier="vote", name="heads")
    shares = pack_from_activations(activations, k=6, name="shares").replace(scoring=None, probe_weight=None, probe_bias=None)
    assert (probe.classifier, by_probability.classifier, shares.format_version) == ("probe", "vote", 1)
    result = export_bundle(loaded, [probe, by_probability, shares], tmp_path / "bundle")
    entries = result.info["packs"]
    assert [entry["calibrated"] for entry in entries] == [True, True, False]
    assert all(entry["outputs"]["probabilities"] == f"pack{index}.probabilities" for index, entry in enumerate(entries))

    classifier = Classifier.load(result.folder, threads=1)
    texts = [example.text for example in test]
    outputs = classifier.graph_outputs(texts)
    vectors = outputs[graph_inputs.OUTPUT_NAME]
    expected = {}
    for index, (entry, pack) in enumerate(zip(classifier.bundle.packs, (probe, by_probability, shares))):
        reference = scoring.pack_decision(pack, vectors[:, entry.positions])  # numpy from the head vectors alone
        found = outputs[f"pack{index}.probabilities"]
        assert np.abs(found - reference.probabilities).max() <= 1e-6
        assert np.array_equal(outputs[f"pack{index}.prediction"], reference.predictions)
        expected[entry.name] = [pack.labels[i] for i in reference.predictions]
    assert np.array_equal(outputs["pack2.probabilities"], (outputs["pack2.votes"] / shares.k).astype(np.float32))  # shares
    assert len(set(expected["probe"])) > 1
    monkeypatch.setattr(scoring, "probabilities", lambda *args, **kwargs: pytest.fail("numpy's probabilities ran"))
    monkeypatch.setattr(scoring, "vote", lambda *args, **kwargs: pytest.fail("numpy's vote ran"))
    results = classifier.classify_batch(texts)
    for index, name in enumerate(expected):
        assert [result.by_pack[name].label for result in results] == expected[name]
        assert [result.by_pack[name].calibrated for result in results] == [name != "shares"] * len(texts)
        graph = outputs[f"pack{index}.probabilities"]
        assert all(list(result.by_pack[name].probabilities.values()) == pytest.approx(row.tolist(), abs=1e-7)
                   for result, row in zip(results, graph))


def test_the_export_refuses_in_graph_scores_that_differ_from_numpys(loaded_model, packs, tmp_path, monkeypatch):
    """Validation compares every pack's in-graph probabilities and label with savpack_runtime.scoring: a graph whose
    probabilities ignore the sharpening, or whose probe label is the vote's, is not written."""
    import torch

    from savpack.export import scores

    calibrated = [pack for pack in packs("qwen2") if pack.scoring_model is not None]
    assert calibrated and all(pack.scoring["sharpness"] != 1.0 for pack in calibrated if pack.classifier == "vote")
    real = scores.PackScores.probabilities

    def unsharpened(self, vectors, cosines, votes):
        if self.model != "heads":
            return real(self, vectors, cosines, votes)
        return torch.softmax(cosines.to(torch.float64) / self.temperature, dim=-1).mean(dim=1)

    monkeypatch.setattr(scores.PackScores, "probabilities", unsharpened)
    with pytest.raises(ExportValidationError, match="in-graph probabilities differ from savpack_runtime's numpy scores"):
        export_bundle(loaded_model("qwen2"), calibrated, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_int8_export_is_checked_on_the_packs_own_examples(loaded_model, packs, text_task, tmp_path):
    """--quantize int8: standard operators only, int8 weights, the vote kept in float32, each pack's agreement with
    the float32 graph on its own training examples recorded; held-out examples are not a pack's own."""
    import onnx

    from savpack.export import quantize

    loaded = loaded_model("qwen2")
    train, test = (load_examples(path) for path in text_task)
    result = export_bundle(loaded, packs("qwen2"), tmp_path / "int8", quantize="int8", examples=train + test)
    report = result.quantization
    assert result.info["graph"]["weights"] == "int8" and result.info["graph"]["quantization"] == report.to_dict()
    own = len({example.text for example in train})  # each example once (the generated set repeats a few)
    assert report.examples == {"qwen2-paper": own, "qwen2-loo": own}  # the test items (not theirs) are left out
    assert all(value >= quantize.DEFAULT_MIN_AGREEMENT for value in report.agreement.values())
    model = onnx.load(str(result.folder / "graph.onnx"), load_external_data=False)
    operators = {node.op_type for node in model.graph.node}
    assert {"MatMulInteger", "QuantizeLinear", "ReduceMax"} <= operators and {opset.domain for opset in model.opset_import} <= {"", "ai.onnx"}
    assert "DynamicQuantizeLinear" not in operators  # one scale per batch: labels that depend on the batch
    assert all(node.op_type != "MatMulInteger" for node in model.graph.node if node.name.startswith("/scores"))
    float32 = export_bundle(loaded, packs("qwen2"), tmp_path / "float32")
    assert result.sizes["graph.onnx.data"] < 0.5 * float32.sizes["graph.onnx.data"]
    labels = Classifier.load(result.folder).classify_batch([example.text for example in train])
    assert np.mean([result.label == example.label for result, example in zip(labels, train)]) > 0.5
    unseen = [Example(f"a text never seen {index}", label="warm") for index in range(3)]
    with pytest.raises(ExportError, match="none of the 3 given examples belong to pack"):
        export_bundle(loaded, packs("qwen2"), tmp_path / "none", quantize="int8", examples=unseen)
    with pytest.raises(ExportError, match="exclude each other"):
        export_bundle(loaded, packs("qwen2"), tmp_path / "both", quantize="int8", examples=train, fp16=True)


@pytest.mark.parametrize("keep_float", ["none", "auto"])
def test_an_items_int8_result_does_not_depend_on_the_items_batched_with_it(loaded_model, packs, text_task, tmp_path,
                                                                          keep_float):
    """Each token's activations are quantized with their own range, so an item's int8 head vectors are the same
    alone and in a batch of items of other lengths, up to the float parts' rounding (onnxruntime's dynamic
    quantization, one range per batch, moved up to 38% of a real bundle's labels between batch 8 and batch 1). A
    float rounding difference (padding, the rotation's product) can move a token's uint8 value by one step: 1e-3 of
    the largest value bounds that (measured 8.5e-4 on this toy, all-int8)."""
    train, test = (load_examples(path) for path in text_task)
    result = export_bundle(loaded_model("qwen2"), packs("qwen2"), tmp_path / "int8", quantize="int8", examples=train,
                           keep_float=keep_float)
    assert result.quantization.keep_float == keep_float
    classifier = Classifier.load(result.folder)
    texts = sorted({example.text for example in train + test}, key=len)
    texts = texts[::max(1, len(texts) // 16)]  # short and long: the batches are padded
    assert len({len(text) for text in texts}) > 4
    together, alone = classifier.head_vectors(texts, batch_size=16), classifier.head_vectors(texts, batch_size=1)
    assert np.abs(together - alone).max() <= 1e-3 * np.abs(alone).max()
    labels = [[result.by_pack[name].label for name in classifier.pack_names] for result in classifier.classify_batch(texts)]
    assert labels == [[classifier.classify(text).by_pack[name].label for name in classifier.pack_names] for text in texts]


@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_weights_have_a_scale_per_column_or_one_per_matrix(loaded_model, packs, text_task, tmp_path, per_channel):
    import onnx
    from onnx import numpy_helper

    train = load_examples(text_task[0])
    result = export_bundle(loaded_model("qwen2"), packs("qwen2"), tmp_path / "int8", quantize="int8", examples=train,
                           per_channel=per_channel)
    assert result.info["graph"]["quantization"]["per_channel"] is per_channel
    model = onnx.load(str(result.folder / "graph.onnx"))
    scales = [numpy_helper.to_array(tensor) for tensor in model.graph.initializer
              if tensor.name.startswith("q8.") and tensor.name.endswith(".scale")]
    assert scales and all(scale.ndim == 1 for scale in scales)
    assert all((len(np.unique(scale)) > 1) is per_channel for scale in scales)
    labels = Classifier.load(result.folder).classify_batch([example.text for example in train])
    assert np.mean([result.label == example.label for result, example in zip(labels, train)]) > 0.5


def test_keep_float_auto_keeps_float32_the_groups_that_disturb_the_packs_examples_most(loaded_model, packs, text_task,
                                                                                       tmp_path, monkeypatch):
    """--keep-float auto (the default with the packs' own examples): every MatMul group is judged alone on those
    examples; the int8 ones are the least disturbing, the longest such prefix within the budget that keeps every
    example's label; the graph has integer products exactly for them; the record in bundle.json says which stayed
    float32, and its all-int8 disturbance is what the all-int8 export does to the examples' cosines."""
    import onnx

    from savpack.export import quantize
    from savpack_runtime.vote import cosine_to_centroids

    loaded, train = loaded_model("qwen2"), load_examples(text_task[0])
    # Within a budget the all-int8 graph meets, every group is int8 and none is judged alone.
    monkeypatch.setattr(quantize, "DISTURBANCE_BUDGET", 1e9)
    relaxed = export_bundle(loaded, packs("qwen2"), tmp_path / "relaxed", quantize="int8", examples=train).quantization
    groups_count = len(relaxed.mixed["int8_groups"])
    assert relaxed.mixed["float32_groups"] == [] and relaxed.mixed["disturbance_alone"] == {}
    full = relaxed.mixed["prefixes"][str(groups_count)]
    assert list(relaxed.mixed["prefixes"]) == [str(groups_count)] and all(value["agreement"] == 1.0 for value in full.values())
    # Half the all-int8 graph's disturbance of the most disturbed pack: some groups must stay float32.
    budget = max(value["disturbance"] for value in full.values()) / 2
    monkeypatch.setattr(quantize, "DISTURBANCE_BUDGET", budget)
    result = export_bundle(loaded, packs("qwen2"), tmp_path / "auto", quantize="int8", examples=train)
    report = result.quantization
    mixed = result.info["graph"]["quantization"]["mixed"]
    assert report.keep_float == "auto" and mixed == json.loads(json.dumps(report.mixed)) and mixed["budget"] == budget
    int8, float32, alone = mixed["int8_groups"], mixed["float32_groups"], mixed["disturbance_alone"]
    assert int8 and float32 and set(int8) | set(float32) == set(alone) and not set(int8) & set(float32)
    assert len(alone) == groups_count and max(alone[group] for group in int8) <= min(alone[group] for group in float32)
    assert mixed["prefixes"][str(groups_count)] == full
    chosen = mixed["prefixes"][str(len(int8))]
    assert all(value["agreement"] == 1.0 and value["disturbance"] <= budget for value in chosen.values())
    longer = mixed["prefixes"][str(len(int8) + 1)]  # the next prefix was judged, and refused
    assert any(value["agreement"] < 1.0 or value["disturbance"] > budget for value in longer.values())

    model = onnx.load(str(result.folder / "graph.onnx"), load_external_data=False)
    names = {node.name for node in model.graph.node}
    groups = quantize.matmul_groups(onnx.load(str(export_bundle(loaded, packs("qwen2"), tmp_path / "float32").folder
                                                   / "graph.onnx"), load_external_data=False))
    assert all(set(groups[group]) <= names for group in float32)  # float32 MatMuls kept as they were
    assert not any(set(groups[group]) & names for group in int8)  # replaced by integer products
    assert sum(node.op_type == "MatMulInteger" for node in model.graph.node) == sum(len(groups[group]) for group in int8)

    # The recorded all-int8 disturbance, recomputed from the all-int8 export's results on the same examples: the
    # change of the log-probability lead of each example's most probable class over its runner-up (float32's two)
    # over the float32 lead; and the heads' cosines, the same way.
    everything = export_bundle(loaded, packs("qwen2"), tmp_path / "none", quantize="int8", examples=train, keep_float="none")
    assert everything.quantization.mixed is None and everything.info["graph"]["quantization"]["keep_float"] == "none"
    from test_specs import EXPORT_SCHEMAS, check

    for bundle in (result, everything):  # bundle.json as docs/export.md documents it
        check(EXPORT_SCHEMAS["bundle.json"], json.loads((bundle.folder / "bundle.json").read_text()))
    texts = [example.text for example in training_examples(packs("qwen2")[0], train)]
    before, after = (Classifier.load(folder) for folder in (tmp_path / "float32", everything.folder))
    for entry in before.bundle.packs:
        probabilities = [np.log(np.maximum([[result.by_pack[entry.name].probabilities[label] for label in entry.pack.labels]
                                            for result in classifier.classify_batch(texts)], 1e-30))
                         for classifier in (before, after)]  # (S, C) each
        ranked = np.argsort(probabilities[0], axis=1)
        leads = [np.take_along_axis(values, ranked[:, -1:], 1) - np.take_along_axis(values, ranked[:, -2:-1], 1)
                 for values in probabilities]
        expected = np.mean(np.abs(leads[1] - leads[0])) / np.mean(leads[0])
        assert full[entry.name]["disturbance"] == pytest.approx(expected, rel=2e-2, abs=1e-5)
        cosines = [cosine_to_centroids(classifier.head_vectors(texts)[:, entry.positions], entry.pack.centroids).astype(np.float64)
                   for classifier in (before, after)]
        ordered = np.sort(cosines[0], axis=-1)
        expected = np.mean(np.abs(cosines[1] - cosines[0])) / np.mean(ordered[..., -1] - ordered[..., -2])
        assert full[entry.name]["head_disturbance"] == pytest.approx(expected, rel=1e-3)

    # No group can be int8 within a budget of zero: refused, nothing written.
    monkeypatch.setattr(quantize, "DISTURBANCE_BUDGET", 0.0)
    with pytest.raises(ExportError, match="no MatMul group can be int8 without"):
        export_bundle(loaded, packs("qwen2"), tmp_path / "zero", quantize="int8", examples=train)
    assert not (tmp_path / "zero").exists()
    with pytest.raises(ExportError, match="--keep-float auto chooses the float32 groups on the packs' own examples"):
        export_bundle(loaded, packs("qwen2"), tmp_path / "held", quantize="int8", check_items=train, keep_float="auto")
    with pytest.raises(ExportError, match="keep_float goes with quantize='int8'"):
        export_bundle(loaded, packs("qwen2"), tmp_path / "float", keep_float="none")


def test_the_shot_judge_measures_an_int8_version_of_the_graph_against_float32(tmp_path):
    """Nothing int8: every label kept, no disturbance; the weight MatMuls, or the embedding table, int8: some
    disturbance; the bundle's folder left as it was (the scan graph is removed)."""
    import shutil

    import onnx

    from savpack.export import quantize

    golden = os.path.join(os.path.dirname(__file__), "..", "exported", "bundles", "qwen2")
    source = tmp_path / "bundle"
    shutil.copytree(os.path.join(golden, "bundle"), source)  # the judge writes its scan graph beside the weights
    items = [json.loads(line)["text"] for line in open(os.path.join(golden, "items.jsonl"), encoding="utf-8")]
    judge = quantize.ShotJudge(source, {"words": items}, lambda model, names, embedding: quantize.quantize_per_token(
        model, names, True, embedding, base_dir=source), threads=1)
    assert judge.judge([], embedding=False) == {"words": {"agreement": 1.0, "disturbance": 0.0, "head_disturbance": 0.0,
                                                          "head_agreement": 1.0}}
    names = quantize.weight_matmuls(onnx.load(str(source / "graph.onnx"), load_external_data=False))
    everything = judge.judge(names, embedding=False)["words"]
    assert everything["disturbance"] > 0 and everything["head_disturbance"] > 0 and 0.5 < everything["head_agreement"] <= 1.0
    assert judge.judge([], embedding=True)["words"]["disturbance"] > 0
    assert sorted(path.name for path in source.iterdir()) == sorted(os.listdir(os.path.join(golden, "bundle")))


def _one_node_model(node, x_shape: list, y_shape: list, initializers: dict[str, np.ndarray]):
    """An ONNX model of one node from input "x" to output "y", its other inputs the given initializers."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(value.astype(np.float32), name) for name, value in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _matmul_graph(weight: np.ndarray):
    """x (batch, tokens, K) . weight (K, N): a one-MatMul ONNX model."""
    from onnx import helper

    return _one_node_model(helper.make_node("MatMul", ["x", "w"], ["y"], name="project"),
                           [None, None, weight.shape[0]], [None, None, weight.shape[1]], {"w": weight})


def test_rows_rotated_before_their_uint8_rounding_lose_less_and_the_product_stays_exact_in_float():
    """The block Hadamard rotation is orthogonal (x R . R^T W = x W); rows with a few large channels (what real
    models' activations have) rounded after it lose far less of the product than rounded as they are."""
    import onnxruntime

    from savpack.export import quantize

    assert [quantize.rotation_block(width) for width in (640, 384, 2048, 48, 24, 1000)] == [128, 128, 128, 16, 0, 0]
    rotation = quantize.hadamard(128).astype(np.float64)
    assert np.allclose(rotation @ rotation.T, np.eye(128), atol=1e-6)
    generator = np.random.default_rng(0)
    weight = generator.normal(size=(256, 48)).astype(np.float32)
    x = generator.normal(size=(3, 5, 256)).astype(np.float32)
    x[..., [7, 100, 200]] *= 60.0  # outlier channels
    rotated = np.concatenate([x[..., start:start + 128] @ rotation for start in (0, 128)], axis=-1)
    assert np.allclose(rotated @ quantize.rotate_rows(weight, 128), x @ weight, rtol=1e-4, atol=1e-3)

    errors = {}
    for rotate in (False, True):
        model = _matmul_graph(weight)
        quantize.quantize_per_token(model, ["project"], rotate=rotate)
        ops = [node.op_type for node in model.graph.node]
        assert ops.count("MatMulInteger") == 1 and ops.count("MatMul") == (1 if rotate else 0)
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        found = session.run(None, {"x": x})[0]
        errors[rotate] = np.abs(found - x @ weight).mean() / np.abs(x @ weight).mean()
    assert errors[True] < 0.01 and errors[True] < errors[False] / 2  # measured 0.0079 against 0.022
    model = _matmul_graph(weight[:24])  # a width no block of 16 or more divides: not rotated
    quantize.quantize_per_token(model, ["project"])
    assert [node.op_type for node in model.graph.node].count("MatMul") == 0


class _FakeJudge:
    """Each MatMul disturbs by its weight in `cost`; making `breaks` int8 changes an example's label."""

    def __init__(self, cost: dict[str, float], breaks: str):
        self.cost, self.breaks = cost, breaks

    def judge(self, names, embedding):
        return {"pack": {"agreement": 0.9 if self.breaks in names else 1.0,
                         "disturbance": sum(self.cost[name] for name in names) + (0.5 if embedding else 0.0)}}


def test_the_int8_choice_keeps_float32_what_moves_the_examples_labels_and_what_exceeds_the_budget():
    from savpack.export.quantize import EMBEDDING_GROUP, choose_int8_groups

    groups = {"a": ["a1"], "b": ["b1"], "c": ["c1", "c2"], "d": ["d1"], EMBEDDING_GROUP: []}
    judge = _FakeJudge({"a1": 0.1, "b1": 0.2, "c1": 1.0, "c2": 1.0, "d1": 0.3}, breaks="b1")
    # b changes a label: every prefix holding it fails, so only "a" (the least disturbing) is int8, whatever the budget
    for budget in (None, 0.5):
        chosen = choose_int8_groups(judge, groups, budget, progress=False)
        assert chosen["int8_groups"] == ["a"] and chosen["float32_groups"] == ["b", "c", "d", EMBEDDING_GROUP]
    judge.breaks = "none"
    assert choose_int8_groups(judge, groups, None, progress=False)["float32_groups"] == []
    # all-int8 disturbs 3.1; 1.55 admits a, b, d and the embedding (1.1), not c (2.0 more)
    chosen = choose_int8_groups(judge, groups, 1.55, progress=False)
    assert chosen["int8_groups"] == ["a", "b", "d", EMBEDDING_GROUP] and chosen["float32_groups"] == ["c"]
    assert chosen["disturbance_alone"] == {"a": 0.1, "b": 0.2, "c": 2.0, "d": 0.3, EMBEDDING_GROUP: 0.5}
    assert sorted(chosen["prefixes"], key=int)[-1] == "5" and chosen["prefixes"]["4"]["pack"]["disturbance"] == 1.1


class _CountingJudge(_FakeJudge):
    def __init__(self, *args):
        super().__init__(*args)
        self.calls = 0

    def judge(self, names, embedding):
        self.calls += 1
        return super().judge(names, embedding)


def test_the_int8_choice_makes_every_group_int8_unscanned_when_the_whole_graph_fits():
    """A pack whose decisions int8 never moves (saturated probabilities: disturbance 0), or a budget above the
    all-int8 graph's disturbance: one judgement, every group int8."""
    from savpack.export.quantize import EMBEDDING_GROUP, choose_int8_groups

    groups = {"a": ["a1"], "b": ["b1"], "c": ["c1", "c2"], "d": ["d1"], EMBEDDING_GROUP: []}
    judge = _CountingJudge({"a1": 0.1, "b1": 0.2, "c1": 1.0, "c2": 1.0, "d1": 0.3}, "none")
    chosen = choose_int8_groups(judge, groups, 3.1, progress=False)
    assert judge.calls == 1 and chosen["float32_groups"] == [] and chosen["disturbance_alone"] == {}
    assert chosen["int8_groups"] == list(groups) and list(chosen["prefixes"]) == ["5"]
    judge.calls = 0
    assert choose_int8_groups(judge, groups, 3.0, progress=False)["float32_groups"] == ["c"] and judge.calls > 1


def _flatten_token_embeddings(source, target, per_channel, *groups):
    """A stand-in for quantize_graph that damages the labels: the float32 graph with its token embeddings flattened
    to one row."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    table = next(tensor for tensor in model.graph.initializer if "embed_tokens" in tensor.name)
    values = numpy_helper.to_array(table)
    table.CopyFrom(numpy_helper.from_array(np.broadcast_to(values[:1], values.shape).copy(), table.name))
    onnx.save_model(model, str(target), save_as_external_data=True, location=target.name + ".data")


def test_an_int8_graph_that_moves_the_labels_is_refused(loaded_model, packs, text_task, tmp_path, monkeypatch):
    """A quantized graph that labels the packs' own examples differently is refused (nothing written) unless the
    threshold is lowered; the message gives each pack's agreement."""
    from savpack.export import quantize

    monkeypatch.setattr(quantize, "quantize_graph", _flatten_token_embeddings)
    loaded, train = loaded_model("qwen2"), load_examples(text_task[0])
    with pytest.raises(ExportError, match=r"labels items differently .*qwen2-paper: \d+\.\d% of its \d+ own examples"):
        export_bundle(loaded, packs("qwen2"), tmp_path / "bundle", quantize="int8", examples=train)
    assert not (tmp_path / "bundle").exists()
    accepted = export_bundle(loaded, packs("qwen2"), tmp_path / "bundle", quantize="int8", examples=train, min_agreement=0.0)
    assert min(accepted.quantization.agreement.values()) < quantize.DEFAULT_MIN_AGREEMENT


def test_int8_export_checks_held_out_items(loaded_model, packs, text_task, tmp_path, monkeypatch):
    """check_items (--check-data): held-out items, labelled or not, every pack labels with both graphs; their
    agreement is recorded and must reach min_agreement too, even where the packs' own examples all agree."""
    from savpack.export import quantize

    loaded = loaded_model("qwen2")
    train, test = (load_examples(path) for path in text_task)
    result = export_bundle(loaded, packs("qwen2"), tmp_path / "int8", quantize="int8", examples=train, check_items=test)
    held = result.quantization.held_out
    assert result.info["graph"]["quantization"]["held_out"] == held and held["items"] == len(test)
    assert set(held["agreement"]) == {"qwen2-paper", "qwen2-loo"}
    assert all(held["accuracy"][name]["items"] == len(test) and held["accuracy"][name]["int8"] is not None for name in held["agreement"])
    float32 = [result.by_pack["qwen2-paper"].label for result in
               Classifier.load(export_bundle(loaded, packs("qwen2"), tmp_path / "float32").folder).classify_batch([e.text for e in test])]
    int8 = [result.by_pack["qwen2-paper"].label for result in Classifier.load(result.folder).classify_batch([e.text for e in test])]
    assert held["agreement"]["qwen2-paper"] == np.mean([a == b for a, b in zip(float32, int8)])

    # Unlabelled items alone: agreement without accuracy, and no own-example check.
    # (a label outside the pack's classes counts for agreement, not for accuracy).
    unlabelled = [Example(example.text, source=example.source) for example in test] + [Example("a fog", label="hot", source="c:1")]
    alone = export_bundle(loaded, packs("qwen2"), tmp_path / "alone", quantize="int8", check_items=unlabelled).quantization
    assert alone.examples == {} and alone.held_out["accuracy"]["qwen2-paper"] == {"items": 0, "float32": None, "int8": None}
    assert alone.held_out["items"] == len(test) + 1
    with pytest.raises(ExportError, match="has 1 image"):
        export_bundle(loaded, packs("qwen2"), tmp_path / "image", quantize="int8",
                      check_items=[Example("a", images=(str(tmp_path / "x.png"),), source="c.jsonl:1")])
    with pytest.raises(ExportError, match="go with quantize='int8'"):
        export_bundle(loaded, packs("qwen2"), tmp_path / "none", check_items=test)

    # A graph that moves the labels is refused by the held-out check alone (no own examples given).
    monkeypatch.setattr(quantize, "quantize_graph", _flatten_token_embeddings)
    with pytest.raises(ExportError, match=r"qwen2-paper: \d+\.\d% of the \d+ --check-data items"):
        export_bundle(loaded, packs("qwen2"), tmp_path / "moved", quantize="int8", check_items=test)
    assert not (tmp_path / "moved").exists()


def test_savpack_export_quantize_command(model_dir, packs, text_task, tmp_path):
    path = packs("qwen2")[0].save(tmp_path / "a.safetensors")
    base = ["export", "--pack", str(path), "--model", str(model_dir("qwen2")), "--out", str(tmp_path / "bundle")]
    missing = CliRunner().invoke(main, base + ["--quantize", "int8"])
    assert missing.exit_code == 2 and "needs --data" in missing.output
    done = CliRunner().invoke(main, base + ["--quantize", "int8", "--data", str(text_task[0]), "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["weights"] == "int8" and summary["quantization"]["agreement"]["qwen2-paper"] >= 0.98
    mixed = summary["quantization"]["mixed"]  # this toy's all-int8 graph fits the budget: every group int8
    assert summary["quantization"]["keep_float"] == "auto" and mixed["int8_groups"] and mixed["float32_groups"] == []
    held = CliRunner().invoke(main, base + ["--quantize", "int8", "--check-data", str(text_task[1]), "--force"])
    assert held.exit_code == 0, held.output
    assert "labels equal to float32's on the" in held.output and "--check-data items: qwen2-paper" in held.output
    info = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert info["graph"]["quantization"]["held_out"]["items"] == len(load_examples(text_task[1]))
    assert info["graph"]["quantization"]["keep_float"] == "none"  # no own examples to choose on
    told = CliRunner().invoke(main, base + ["--quantize", "int8", "--data", str(text_task[0]), "--force"])
    assert told.exit_code == 0 and "MatMul groups int8" in told.output and "kept float32" in told.output
    for wrong, message in ([["--keep-float", "none"], "go with --quantize int8"],
                           [["--quantize", "int8", "--check-data", str(text_task[1]), "--keep-float", "auto"], "give their training data with --data"],
                           [["--quantize", "int8", "--data", str(text_task[0]), "--keep-float", "some"], "'some' is not one of"]):
        refused = CliRunner().invoke(main, base + wrong + ["--force"])
        assert refused.exit_code == 2 and message in refused.output, refused.output


def test_gpt2s_gemm_products_are_int8_too(loaded_model, text_task, tmp_path):
    """GPT-2's Conv1D exports as Gemm (x . W + b): the int8 export turns each into an integer product plus its bias,
    not only the embedding table, and the head vectors stay near float32's."""
    import onnx

    from savpack.export import quantize

    loaded = loaded_model("gpt2")
    train = load_examples(text_task[0])
    activations = extract_activations(loaded, train, "{text}", batch_size=8, progress=False)
    pack = pack_from_activations(activations, k=6, name="gpt2-words")
    float32 = export_bundle(loaded, [pack], tmp_path / "float32")
    graph = onnx.load(str(float32.folder / "graph.onnx"), load_external_data=False)
    gemms = [node.name for node in graph.graph.node if node.op_type == "Gemm"]
    assert gemms and set(gemms) <= set(quantize.weight_matmuls(graph))
    int8 = export_bundle(loaded, [pack], tmp_path / "int8", quantize="int8", examples=train, keep_float="none")
    ops = [node.op_type for node in onnx.load(str(int8.folder / "graph.onnx"), load_external_data=False).graph.node]
    assert "Gemm" not in ops and ops.count("MatMulInteger") == len(gemms)
    texts = [example.text for example in train]
    expected = Classifier.load(float32.folder).head_vectors(texts)
    found = Classifier.load(int8.folder).head_vectors(texts)
    assert np.abs(found - expected).max() < 0.05 * np.abs(expected).max()
    assert min(int8.quantization.agreement.values()) >= 0.98


@pytest.mark.parametrize("attributes", [{}, {"transB": 1, "alpha": 0.5, "beta": 2.0}])
def test_a_gemm_by_a_weight_matrix_becomes_an_integer_product_plus_its_bias(attributes):
    """Gemm(x, B, C) = alpha x . B (B transposed with transB) + beta C: the int8 rewrite keeps all four."""
    import onnxruntime
    from onnx import helper

    from savpack.export import quantize

    generator = np.random.default_rng(1)
    weight = generator.normal(size=(64, 24)).astype(np.float32)  # (K, N)
    stored = weight.T.copy() if attributes.get("transB") else weight
    bias = generator.normal(size=(24,)).astype(np.float32) * 5
    model = _one_node_model(helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="dense", **attributes),
                            [None, 64], [None, 24], {"w": stored, "b": bias})
    assert quantize.weight_matmuls(model) == ["dense"]
    quantize.quantize_per_token(model, ["dense"])
    assert [node.op_type for node in model.graph.node].count("MatMulInteger") == 1
    x = generator.normal(size=(7, 64)).astype(np.float32)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = attributes.get("alpha", 1.0) * x @ weight + attributes.get("beta", 1.0) * bias
    assert np.abs(session.run(None, {"x": x})[0] - expected).max() < 0.02 * np.abs(expected).max()
