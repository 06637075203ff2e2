"""savpack-run classify --engine ray: the same rows as the single-process run, in input order, exactly once, even
when a worker dies mid-run; bad input still gives one clear line."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.data", reason="needs the ray extra")
# A local Ray and its worker processes (one Ray for the session, conftest.py); each test time-limited.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("time_limit")]

import psutil  # noqa: E402  (a dependency of Ray)
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import golden  # noqa: E402
from savpack_runtime.result import records_agree  # noqa: E402
from savpack_runtime.cli import main  # noqa: E402
from savpack_runtime.ray_engine import ACTOR_NAME, Progress, RayOptions, classify_to_file  # noqa: E402

WORDS = "the red sun is here blue ice and snow a circle square triangle dot yellow fire cold warm green".split()


def write_text_items(path: Path, count: int, seed: int = 0) -> Path:
    """JSONL of generated text items, a blank line and a labelled line among them (the reader skips / ignores them)."""
    rng = random.Random(seed)
    lines = [json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(1, 12))), "label": "x"}) for _ in range(count)]
    lines.insert(count // 2, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def single_and_ray(bundle: Path, data: Path, tmp_path: Path, capsys, suffix: str, batch: str = "8") -> tuple[Path, Path]:
    single, on_ray = tmp_path / f"single{suffix}", tmp_path / f"ray{suffix}"
    code, err = run(["classify", str(bundle), "--data", str(data), "--out", str(single), "--threads", "1"], capsys)
    assert code == 0, err
    code, err = run(["classify", str(bundle), "--data", str(data), "--out", str(on_ray), "--engine", "ray",
                     "--workers", "2", "--batch-size", batch], capsys)
    assert code == 0, err
    assert "rows/s" in err
    return single, on_ray


def test_text_rows_equal_the_single_process_run(ray_cluster, tmp_path, capsys):
    data = write_text_items(tmp_path / "items.jsonl", 2000)
    # Small batches: many actor calls on both workers, so rows would come back out of order if order were not kept.
    single, on_ray = single_and_ray(golden.bundle_dir("qwen2"), data, tmp_path, capsys, ".parquet", batch="1")
    expected, got = pq.read_table(single), pq.read_table(on_ray)
    assert got.num_rows == 2000
    assert got.column_names == ["source", "label", "votes.cold", "votes.shape", "votes.warm",
                                "shares.cold", "shares.shape", "shares.warm", "probabilities.cold",
                                "probabilities.shape", "probabilities.warm", "calibrated", "abstained"]
    # Item by item, in input order: sources (file:line, the blank line 301 skipped), labels, votes, probabilities.
    assert got.column("source").to_pylist()[999:1001] == [f"{data}:1000", f"{data}:1002"]
    assert records_agree(got.to_pylist(), expected.to_pylist())
    assert len(set(got.column("label").to_pylist())) > 1  # the generated items do not all get one label


def test_image_bundle_with_two_packs_jsonl_out(ray_cluster, tmp_path, capsys):
    folder = golden.case_dir("qwen2_vl")
    lines = (folder / "items.jsonl").read_text().splitlines() * 6
    data = tmp_path / "items.jsonl"
    # Image paths absolute: the data file lives elsewhere than the images.
    data.write_text("\n".join(json.dumps({**json.loads(line), "images": [str(folder / image) for image in json.loads(line)["images"]]})
                              for line in lines) + "\n")
    single, on_ray = single_and_ray(golden.bundle_dir("qwen2_vl"), data, tmp_path, capsys, ".jsonl", batch="4")
    expected = [json.loads(line) for line in single.read_text().splitlines()]
    got = [json.loads(line) for line in on_ray.read_text().splitlines()]
    assert records_agree(got, expected) and len(got) == 30
    assert set(got[0]["packs"]) == {"colour", "colour-loo"}
    assert [row["label"] for row in got[:5]] == golden.expected("qwen2_vl")["packs"]["colour"]["labels"]


def test_parquet_input_named_by_row(ray_cluster, tmp_path, capsys):
    texts = [" ".join(random.Random(i).choices(WORDS, k=5)) for i in range(50)]
    data = tmp_path / "items.parquet"
    pq.write_table(pa.table({"id": list(range(50)), "question": texts}), data, row_group_size=16)
    single, on_ray = single_and_ray(golden.bundle_dir("gemma3_text"), data, tmp_path, capsys, ".parquet")
    got = pq.read_table(on_ray)
    assert got.column("source").to_pylist()[:2] == [f"{data}[0]", f"{data}[1]"]
    assert records_agree(got.to_pylist(), pq.read_table(single).to_pylist())


def test_image_bytes_in_parquet_and_a_column_mapping(ray_cluster, tmp_path, capsys):
    folder = golden.case_dir("qwen2_vl")
    records = [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines()]
    single_image = [record for record in records if len(record["images"]) == 1]
    data = tmp_path / "photos.parquet"
    pq.write_table(pa.table({
        "prompt": [record["text"] for record in single_image] * 3,
        # as the `datasets` Image feature stores them: encoded bytes, no path
        "photo": [{"bytes": (folder / record["images"][0]).read_bytes(), "path": None} for record in single_image] * 3,
    }), data)
    mapping = ["--text-field", "prompt", "--image-field", "photo"]
    single, on_ray = tmp_path / "single.parquet", tmp_path / "ray.parquet"
    assert main(["classify", str(golden.bundle_dir("qwen2_vl")), "--data", str(data), "--out", str(single), *mapping]) == 0
    code, err = run(["classify", str(golden.bundle_dir("qwen2_vl")), "--data", str(data), "--out", str(on_ray),
                     "--engine", "ray", "--batch-size", "2", *mapping], capsys)
    assert code == 0, err
    got = pq.read_table(on_ray).to_pylist()
    assert records_agree(got, pq.read_table(single).to_pylist()) and len(got) == 3 * len(single_image)
    expected = golden.expected("qwen2_vl")["packs"]["colour"]["labels"]
    assert [row["label"] for row in got[:len(single_image)]] == [label for label, record in zip(expected, records)
                                                                 if len(record["images"]) == 1]


def test_abstention_on_ray_is_the_single_process_one(ray_cluster, tmp_path, capsys):
    """--abstain-below reaches the actors: the same labels withheld as in the single-process run."""
    data = write_text_items(tmp_path / "items.jsonl", 60, seed=5)
    free = tmp_path / "free.parquet"
    assert main(["classify", str(golden.bundle_dir("qwen2")), "--data", str(data), "--out", str(free)]) == 0
    tops = sorted(max(row[key] for key in row if key.startswith("probabilities.")) for row in pq.read_table(free).to_pylist())
    threshold = str((tops[len(tops) // 2 - 1] + tops[len(tops) // 2]) / 2)
    single, on_ray = tmp_path / "single.parquet", tmp_path / "ray.parquet"
    assert main(["classify", str(golden.bundle_dir("qwen2")), "--data", str(data), "--out", str(single),
                 "--abstain-below", threshold]) == 0
    code, err = run(["classify", str(golden.bundle_dir("qwen2")), "--data", str(data), "--out", str(on_ray),
                     "--engine", "ray", "--abstain-below", threshold], capsys)
    assert code == 0, err
    got, expected = pq.read_table(on_ray).to_pylist(), pq.read_table(single).to_pylist()
    assert records_agree(got, expected)
    assert 0 < sum(row["abstained"] for row in got) < len(got)
    assert all((row["label"] is None) == row["abstained"] for row in got)


def test_a_folder_of_jsonl_and_parquet_files(ray_cluster, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    write_text_items(folder / "a.jsonl", 40, seed=3)
    pq.write_table(pa.table({"text": [" ".join(random.Random(i).choices(WORDS, k=4)) for i in range(30)]}), folder / "b.parquet")
    out = tmp_path / "ray.parquet"
    code, err = run(["classify", str(golden.bundle_dir("qwen2")), "--data", str(folder), "--out", str(out), "--engine", "ray"], capsys)
    assert code == 0, err
    got = {row["source"]: row for row in pq.read_table(out).to_pylist()}
    assert len(got) == 70
    for name in ("a.jsonl", "b.parquet"):
        single = tmp_path / f"{name}.parquet"
        assert main(["classify", str(golden.bundle_dir("qwen2")), "--data", str(folder / name), "--out", str(single)]) == 0
        for row in pq.read_table(single).to_pylist():
            assert records_agree(got[row["source"]], row)  # sources name each file under the folder as the user named it


def test_a_killed_worker_loses_and_repeats_no_row(ray_cluster, tmp_path, capsys):
    data = write_text_items(tmp_path / "items.jsonl", 3000, seed=1)
    single = tmp_path / "single.parquet"
    assert main(["classify", str(golden.bundle_dir("qwen2")), "--data", str(data), "--out", str(single), "--threads", "1"]) == 0
    killed: list[tuple[psutil.Process, int]] = []  # (the worker, rows done when it was killed)
    done = 0

    def kill_one_worker(rows: int) -> None:
        nonlocal done
        done += rows
        if killed:
            return
        workers = [process for process in psutil.Process().children(recursive=True)
                   if ACTOR_NAME in " ".join(_cmdline(process))]
        assert len(workers) == 2, [_cmdline(process) for process in workers]
        os.kill(workers[0].pid, signal.SIGKILL)
        killed.append((workers[0], done))

    out = tmp_path / "ray.parquet"
    summary = classify_to_file(golden.bundle_dir("qwen2"), [str(data)], out, RayOptions(workers=2, batch_size=8),
                               progress=Progress(every=1e9), on_rows=kill_one_worker)
    worker, rows_at_kill = killed[0]
    # A SIGKILLed process is still "running" while the kernel tears down its memory (Ray's shared-memory maps take a
    # moment): wait, bounded, for it to be gone or a zombie. psutil.Process also remembers the start time, so a later
    # process given the same pid is not taken for it.
    deadline = time.monotonic() + 30
    while worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    assert rows_at_kill < 3000  # killed mid-run, with rows still to come
    got, expected = pq.read_table(out).to_pylist(), pq.read_table(single).to_pylist()
    assert summary["rows"] == len(got) == 3000
    assert len({row["source"] for row in got}) == 3000  # every row exactly once
    assert records_agree(got, expected)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


@pytest.mark.parametrize("content, words", [
    ('{"text": "a"}\nnot json\n', "items.jsonl:2: line is not valid JSON"),
    ('{"text": "a", "image": "missing.png"}\n', "items.jsonl:1: field 'image': image file"),
    ('{"text": "fine"}\n{"text": "has a picture", "images": ["%s"]}\n', "items.jsonl:2: this bundle's prompt is text-only"),
])
def test_bad_items_give_one_line_on_ray(ray_cluster, tmp_path, capsys, content, words):
    data = tmp_path / "items.jsonl"
    picture = golden.case_dir("qwen2_vl") / "items" / "qwen2_vl-0-0.png"
    data.write_text(content.replace("%s", str(picture)))
    out = tmp_path / "out.parquet"
    code, err = run(["classify", str(golden.bundle_dir("qwen2")), "--data", str(data), "--out", str(out), "--engine", "ray"], capsys)
    assert code == 1
    assert words in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.parquet*"))  # nothing half-written


@pytest.mark.parametrize("args, words", [
    (["--workers", "3"], "--workers go(es) with --engine ray"),
    (["--json", "--out", "x.parquet"], "choose one"),
    (["--engine", "ray", "--workers", "0", "--out", "x.parquet"], "--workers must be >= 1"),
])
def test_option_errors(args, words, capsys):
    with pytest.raises(SystemExit):
        main(["classify", str(golden.bundle_dir("qwen2")), "--data", "items.jsonl", *args])
    assert words in capsys.readouterr().err


def test_ray_needs_an_output_file_and_a_known_format(tmp_path, capsys):
    data = write_text_items(tmp_path / "items.jsonl", 3)
    code, err = run(["classify", str(golden.bundle_dir("qwen2")), "--data", str(data), "--engine", "ray"], capsys)
    assert code == 1 and "give --out" in err
    code, err = run(["classify", str(golden.bundle_dir("qwen2")), "--data", str(data), "--out", str(tmp_path / "x.csv")], capsys)
    assert code == 1 and "name it *.parquet or *.jsonl" in err
