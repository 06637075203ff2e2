"""Model loading: families, devices, dtypes, and the errors a user meets."""

import itertools
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from savpack.errors import ModelError
from savpack.models import find_attention_outputs, load_model, resolve_device, resolve_dtype
from savpack_runtime.errors import ModelMismatchError, SavpackWarning


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelError, match="--dtype 'float8'"):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(ModelError, match="--device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda")


def test_grid_and_projections_come_from_structure(loaded_model):
    llama = loaded_model("llama")
    assert llama.grid == (4, 8, 12)  # head_dim 12 from the config, not hidden / heads = 8
    assert [m is layer.self_attn.o_proj for m, layer in zip(llama.attention_outputs, llama.model.model.layers)] == [True] * 4
    vl = loaded_model("qwen2_vl")
    names = {id(m): n for n, m in vl.model.named_modules()}
    assert [names[id(m)] for m in vl.attention_outputs] == [f"model.language_model.layers.{i}.self_attn.o_proj" for i in range(4)]


def test_wrong_grid_is_refused(loaded_model):
    with pytest.raises(ModelError, match="takes 96 inputs, but the config's grid gives 8 heads x 8 head_dim = 64"):
        find_attention_outputs(loaded_model("llama").model, (4, 8, 8))


def test_float16_load_keeps_vectors_close(model_dir, text_task):
    from savpack.data import load_examples
    from savpack.extract import extract

    examples = load_examples(text_task[0])[:3]
    full = extract(load_model(str(model_dir("qwen2")), device="cpu"), examples, progress=False).vectors
    half = extract(load_model(str(model_dir("qwen2")), device="cpu", dtype="bfloat16"), examples, progress=False).vectors
    assert half.dtype == np.float32 and np.abs(full - half).max() < 0.05


def test_model_folder_without_image_processor(model_dir, tmp_path):
    broken = shutil.copytree(model_dir("qwen2_vl"), tmp_path / "no-processor")
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(ModelError, match="no image processor"):
        load_model(str(broken), device="cpu")


def test_unsupported_family_lists_the_supported_ones(tmp_path):
    from transformers import T5Config

    T5Config(num_layers=1, d_model=8, d_kv=4, d_ff=8, num_heads=2, vocab_size=10).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"model type 't5' is not supported\. Supported families: .*qwen2_vl"):
        load_model(str(tmp_path), device="cpu")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    # the hub client reads HF_HUB_OFFLINE once, at import; this machine has no network either way
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="cannot load model 'nobody/no-such-model'.*hub cannot be reached"):
        load_model("nobody/no-such-model", device="cpu")


def test_same_weights_elsewhere_warn_other_weights_refuse(model_dir, loaded_model, text_task, tmp_path):
    from savpack.data import load_examples
    from savpack.testing import build_fixture
    from savpack.pipeline import check_pack_fits, extract_activations, pack_from_activations

    pack = pack_from_activations(extract_activations(loaded_model("qwen2"), load_examples(text_task[0]), progress=False), k=4)
    copy = load_model(str(shutil.copytree(model_dir("qwen2"), tmp_path / "copy")), device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_pack_fits(pack, copy)
    assert any(issubclass(w.category, SavpackWarning) and "fingerprints match" in str(w.message) for w in caught)
    other = load_model(str(build_fixture("qwen2", tmp_path / "other", seed=5)), device="cpu")
    with pytest.raises(ModelMismatchError, match="differ"):
        check_pack_fits(pack, other)
    with pytest.raises(ModelMismatchError, match="grid"):
        check_pack_fits(pack, loaded_model("llama"))
    other.processor.chat_template = other.tokenizer.chat_template = "{{ messages[0]['content'] }}!"
    with pytest.raises(ModelMismatchError, match="renders the pack's prompt differently"):
        check_pack_fits(pack.replace(model={**pack.model, "fingerprint": other.fingerprint()}), other)


def test_local_revision_covers_what_the_model_computes_not_who_wrote_it(model_dir, tmp_path):
    from savpack.models import folder_digest

    folder = tmp_path / "model"
    shutil.copytree(model_dir("qwen2"), folder)
    revision = folder_digest(folder)
    config = json.loads((folder / "config.json").read_text())

    # Another transformers release writes its own version into the JSON files, and other files come and go.
    (folder / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9"}, indent=4))
    (folder / "README.md").write_text("a model card\n")
    (folder / "generation_config.json").write_text('{"max_new_tokens": 5}')
    assert folder_digest(folder) == revision

    # A setting that changes the computation changes the revision; so do other weights.
    (folder / "config.json").write_text(json.dumps({**config, "rms_norm_eps": config["rms_norm_eps"] * 10}))
    assert folder_digest(folder) != revision
    (folder / "config.json").write_text(json.dumps(config))
    assert folder_digest(folder) == revision
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert folder_digest(folder) != revision


@pytest.mark.parametrize("family", ["qwen2", "qwen2_vl"])
def test_a_pack_built_in_one_dtype_fits_the_model_in_every_other(family, model_dir, loaded_model, text_task, colour_task):
    """The fingerprint is independent of the load dtype: packs built at float32, float16 and bfloat16 each fit the
    model loaded at each of the three (all nine pairs), and the same weights elsewhere fit with a warning only."""
    from savpack.data import load_examples
    from savpack.pipeline import check_pack_fits, extract_activations, pack_from_activations

    examples = load_examples(text_task[0] if family == "qwen2" else colour_task[0])[::4]
    loaded = {dtype: load_model(str(model_dir(family)), device="cpu", dtype=dtype) for dtype in ("float32", "float16", "bfloat16")}
    assert len({model.fingerprint() for model in loaded.values()}) == 1
    packs = {dtype: pack_from_activations(extract_activations(model, examples, progress=False), k=2)
             for dtype, model in loaded.items()}
    for built, used in itertools.product(loaded, loaded):
        check_pack_fits(packs[built], loaded[used])
