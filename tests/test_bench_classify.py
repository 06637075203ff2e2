"""tools/bench_classify.py: its FLOP count against torch's own counter, its depths, the real-size configs, and one
small end-to-end run of its three methods (full forward, truncated PyTorch path, runtime) on a tiny fixture."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import bench_classify as bench





def _inputs(loaded, image_size):
    images = [[Image.fromarray(np.random.default_rng(0).integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8))]] \
        if image_size else [[]]
    prompt = loaded.render("{text}", "what colour is the picture here", len(images[0]))
    return loaded.encode([prompt], images)


@pytest.mark.parametrize("name, image_size", [("qwen2_vl", (90, 70)), ("llava_onevision", (90, 70)), ("qwen2", None)])
def test_flop_count_equals_torch_counter(loaded_model, name, image_size):
    """Eager attention computes the full (query, key) square with matmuls, which FlopCounterMode counts: the full
    forward (a) and the truncated one (b) must equal compute_work(causal=False) exactly."""
    from savpack.extract import extract
    from savpack.data import Example

    loaded = loaded_model(name)
    model = loaded.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        inputs = _inputs(loaded, image_size)
        units: list[int] = []
        bench.watch_vision(model, units)
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(**inputs, use_cache=False)
        work = bench.compute_work(model.config, 1, inputs["input_ids"].shape[1], units, causal=False)
        assert counter.get_total_flops() == pytest.approx(work.full(), rel=1e-9)
        assert (units != []) == (image_size is not None)

        heads = np.array([[0, 1], [2, 3]])  # deepest layer 2 of 4
        image_dir = Path(loaded.model_id)
        paths = ()
        if image_size:
            path = image_dir / "bench-test.png"
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8)).save(path)
            paths = (str(path),)
        with FlopCounterMode(display=False) as counter:
            extract(loaded, [Example("what colour is the picture here", paths)], heads=heads, progress=False)
        # transformers runs SigLIP's pooling head in the vision tower (the graph does not need it)
        assert counter.get_total_flops() == pytest.approx(work.truncated(2) + work.vision_head, rel=1e-9)
    finally:
        model.set_attn_implementation(previous)


def test_causal_count_is_about_half_the_square():
    config = argparse.Namespace(get_text_config=lambda decoder: argparse.Namespace(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8, intermediate_size=128,
        vocab_size=400, num_hidden_layers=4))
    square = bench.compute_work(config, 2, 100, [], causal=False)
    causal = bench.compute_work(config, 2, 100, [], causal=True)
    assert causal.layer_attention == pytest.approx(square.layer_attention * 101 / 200)
    assert causal.layer == square.layer and causal.full(1) < causal.full()
    # (c) stops inside the last layer: no o_proj, no MLP, no LM head
    assert causal.truncated(3) < causal.full(1) - causal.lm_head_position


def test_depths_are_quarters_of_the_layers():
    assert bench.depths(24, bench.FRACTIONS) == [5, 11, 17, 23]
    assert bench.depths(28, bench.FRACTIONS) == [6, 13, 20, 27]
    assert bench.depths(4, bench.FRACTIONS) == [0, 1, 2, 3]
    assert bench.depths(4, (0.1, 0.25)) == [0]


@pytest.mark.parametrize("name, parameters", [("llava_ov_05b", 894e6), ("qwen2_vl_2b", 2209e6)])
def test_real_size_configs_have_the_published_sizes(name, parameters):
    """The hand-written configs give the published parameter counts (model cards: 894M and 2.21B); built on the
    meta device, so nothing is allocated."""
    import transformers

    import real_configs as configs
    if name == "llava_ov_05b":
        config = transformers.LlavaOnevisionConfig(**configs.LLAVA_OV_05B)
        model_class = transformers.LlavaOnevisionForConditionalGeneration
    else:
        config = transformers.Qwen2VLConfig(**configs.QWEN2_VL_2B)
        model_class = transformers.Qwen2VLForConditionalGeneration
    with torch.device("meta"):
        model = model_class(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=2e-3)


@pytest.mark.slow
def test_one_small_run_measures_all_three_methods(tmp_path, model_dir, monkeypatch):
    """The benchmark's machinery end to end on the tiny text fixture: packs, bundle, three worker processes, the
    runtime returning the truncated path's head vectors, RSS and FLOPs recorded."""
    monkeypatch.setattr(bench, "model_folder", lambda case, cache, workdir: model_dir("qwen2"))  # the session's fixture
    case = bench.Case("tiny qwen2 (test)", "fixture:qwen2", None, (bench.Plan(1, (0.5,), warmup=0, repeats=1),))
    args = argparse.Namespace(threads=1, cache=tmp_path / "cache", overlap_loads=True)
    result = bench.measure_case(case, args, tmp_path)
    (group,) = result["groups"]
    assert group["deepest"] == 1 and group["layers_run"] == 2
    assert group["same_vectors"] and group["same_labels"] and group["max_vector_difference"] < 1e-4
    assert 0 < group["floor"] < group["floor_last_position_head"] < 1
    assert all(group["peak_rss"][method] > 0 for method in bench.METHODS)
    assert result["workers"]["runtime"]["1"]["banned_imports"] == []
    assert group["runs"]["full"][0]["logits_shape"][-1] > 0
