"""savpack extract --engine ray: actors with one model each write shards that `savpack build --activations` reads,
equal to the single-process extraction."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ray.data", reason="needs the ray extra")

from click.testing import CliRunner  # noqa: E402

from savpack.cli import main  # noqa: E402
from savpack.extract import ActivationSet  # noqa: E402
from savpack_runtime import Pack  # noqa: E402


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_shards_equal_the_single_process_extraction(ray_cluster, model_dir, colour_task, tmp_path):
    model, (train, _) = model_dir("qwen2_vl"), colour_task
    run("extract", "--model", model, "--data", train, "--out", tmp_path / "single.safetensors", "--batch-size", 4)
    result = run("extract", "--model", model, "--data", train, "--out", tmp_path / "shards", "--engine", "ray",
                 "--workers", 2, "--shard-size", 5, "--batch-size", 4)
    assert "24 examples in 5 shards" in result.output
    shards = sorted(path.name for path in (tmp_path / "shards").iterdir())
    assert shards == [f"part-{index:05d}.safetensors" for index in range(5)]
    single, joined = ActivationSet.load(tmp_path / "single.safetensors"), ActivationSet.load(tmp_path / "shards")
    assert joined.sources == single.sources and joined.labels == single.labels and joined.digests == single.digests
    assert joined.model == single.model and joined.prompt == single.prompt
    assert all(np.array_equal(a, b) for a, b in zip(joined.input_ids, single.input_ids))
    np.testing.assert_allclose(joined.activations, single.activations, atol=1e-5)

    run("build", "--activations", tmp_path / "single.safetensors", "--out", tmp_path / "single-pack.safetensors", "--k", 6)
    run("build", "--activations", tmp_path / "shards", "--out", tmp_path / "shards-pack.safetensors", "--k", 6)
    built, expected = Pack.load(tmp_path / "shards-pack.safetensors"), Pack.load(tmp_path / "single-pack.safetensors")
    assert np.array_equal(built.heads, expected.heads)
    np.testing.assert_allclose(built.centroids, expected.centroids, atol=1e-5)

    # An existing output stays unless --force; --force replaces a shards folder whole.
    assert "exists; pass --force" in run("extract", "--model", model, "--data", train, "--out", tmp_path / "shards",
                                         "--engine", "ray", ok=False).output
    run("extract", "--model", model, "--data", train, "--out", tmp_path / "shards", "--engine", "ray", "--shard-size", 30,
        "--force")
    assert [path.name for path in (tmp_path / "shards").iterdir()] == ["part-00000.safetensors"]
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no partial or old folder left


def test_ray_options_need_the_ray_engine(model_dir, text_task, tmp_path):
    result = run("extract", "--model", model_dir("qwen2"), "--data", text_task[0], "--out", tmp_path / "a.safetensors",
                 "--workers", 2, ok=False)
    assert result.exit_code == 2 and "--workers go(es) with --engine ray" in result.output


def test_a_folder_without_shards_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("build", "--activations", tmp_path / "empty", "--out", tmp_path / "p.safetensors", ok=False)
    assert result.exit_code == 1 and "holds no activation shards" in result.output
