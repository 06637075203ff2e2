"""Benchmark: classifying a query three ways, side by side in one run, against the theoretical compute floor.

  (a) full      the full Hugging Face forward with the LM head, as a user of plain transformers runs it:
                processor, then `model(**inputs)` (full-vocabulary logits at every position, the default);
  (b) truncated savpack's PyTorch path: `savpack.pipeline.classify` (`savpack.extract.extract` with the pack's heads,
                hooks on the attention output projections, the forward stopped inside layer L*), then the vote;
  (c) runtime   the torch-free runtime: `savpack_runtime.Classifier` on a bundle made by `savpack export`
                (onnxruntime, the graph truncated inside layer L*), preprocessing and vote included.

For every model, each method runs in its own long-lived process (so peak RSS, import and load time are its own; a
fresh runtime process per L*), all driven by this script, which interleaves them: every repeat runs (a), (b) and (c)
one after the other, in rotating order, and each ratio is taken within a repeat, then the median over repeats. Packs
are made for L* at 1/4, 1/2, 3/4 of the depth and the last layer (k heads drawn at random in layers 0..L*, one of them
in L*; random centroids: speed does not depend on them); the same items (photos of one size, one question) go through
all three, and the benchmark checks that (b) and (c) return the same head vectors.

The floor: matrix-product FLOPs (2 per multiply-add) counted from the model config and the real input shapes
(sequence length, patches or tiles per image): (c) = vision tower and projector + layers 0..L*-1 + layer L*'s q/k/v
projections and attention; (a) = vision + every layer + the LM head at every position (what (a) computes). Attention
counts the causal pairs a query really uses (the graph computes the full masked square). Norms, activations, softmax
and rotary are not counted (< 1% at these sizes). tests/test_bench_classify.py checks the count against torch's
FlopCounterMode.

    python tools/bench_classify.py --out c.json --quick     # tiny fixtures only (< 3 minutes)
    python tools/bench_classify.py --out c.json             # + real-size Qwen2-VL-2B and LLaVA-OV-0.5B, random weights (< 30 min
                                               #   once models and bundles are cached)
    python tools/bench_classify.py --out c.json --profile   # + where (b)'s and (c)'s time goes at batch 1 (35 min in all here)

Results of a run and what they show: docs/benchmarks-classify.md.

Real-size models (tools/real_configs.py) and their bundles are cached in --cache (default /work/cache/bench2,
outside the repository): built and exported once, reused while the pack (and so the bundle's recorded pack digest)
is the same. Results: JSON written atomically to --out, a markdown table
printed last. The machine is shared and noisy: read the ratios; absolute times are context.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from measure import DATA_ROOT as DATA, gigabytes, machine_description, memory_available, reset_peak_rss, rss, write_results
from real_configs import real_size_folder
from savpack.cache import cache_dir

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
QUESTION = "What insect is in this picture?"
TEXT = "the movie was a great film, one of the few that show how good a review can be"
LABELS = ("ants", "bees")
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
METHODS = ("full", "truncated", "runtime")  # (a), (b), (c)
K = 20
VECTOR_TOLERANCE = 1e-3  # |(b) - (c)| <= tol * (1 + |(b)|): export validates to 1e-4; batches here are larger


@dataclass(frozen=True)
class Plan:
    """What to measure at one batch size: at which depths, with how many warm-up and measured repeats."""

    batch: int
    fractions: tuple[float, ...] = FRACTIONS
    warmup: int = 1
    repeats: int = 5


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # "fixture:<savpack.testing.FIXTURES name>" or "real:<tools/real_configs.py name>"
    image: tuple[int, int] | None  # (width, height) of every photo; None: a text-only prompt
    plans: tuple[Plan, ...]
    note: str = ""

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in self.name.lower()).strip("_")

    @property
    def real(self) -> bool:
        return self.model.startswith("real:")


TINY = (
    Case("tiny qwen2_vl", "fixture:qwen2_vl", (112, 112), (Plan(1, warmup=2, repeats=7), Plan(8, warmup=2, repeats=5))),
    Case("tiny llava_onevision", "fixture:llava_onevision", (112, 112), (Plan(1, warmup=2, repeats=7), Plan(8, warmup=2, repeats=5))),
    Case("tiny qwen2 (text)", "fixture:qwen2", None, (Plan(1, warmup=2, repeats=7), Plan(8, warmup=2, repeats=5))),
)
# Sized for the 30-minute budget on 2 shared cores at one thread (one fp32 forward of the full models here: Qwen2-VL-2B
# ~8 s with a 112x112 photo, LLaVA-OV-0.5B ~80-110 s with any photo, whose anyres layout always gives 2 tiles and
# ~1350-1500 tokens).
REAL = (
    Case("Qwen2-VL-2B", "real:qwen2_vl_2b", (112, 112), (Plan(1, warmup=1, repeats=3), Plan(8, (0.5, 1.0), warmup=0, repeats=1)),
         note="112x112 photos: 64 patches, 16 image tokens, 48 tokens in all"),
    Case("LLaVA-OV-0.5B", "real:llava_ov_05b", (384, 288), (Plan(1, (0.25, 1.0), warmup=0, repeats=1),),
         note="384x288 photos: base view + 1 tile (2 x 729 patches), 1346 tokens"),
)
EXTENDED = (
    Case("Qwen2-VL-2B", "real:qwen2_vl_2b", (224, 224), (Plan(1, warmup=1, repeats=3), Plan(8, warmup=0, repeats=1)),
         note="224x224 photos: 256 patches, 64 image tokens"),
    Case("LLaVA-OV-0.5B", "real:llava_ov_05b", (384, 288), (Plan(1, warmup=1, repeats=3), Plan(8, (0.5,), warmup=0, repeats=1)),
         note="384x288 photos: base view + 1 tile, 1346 tokens"),
)


def depths(layers: int, fractions: tuple[float, ...]) -> list[int]:
    """L* (0-based) for each fraction of the depth: the layer where layers 0..L* are that fraction of all layers."""
    return sorted({max(0, math.ceil(fraction * layers) - 1) for fraction in fractions})


# -- compute: matrix-product FLOPs from the config and the shapes -----------------------------------------------------


@dataclass
class Work:
    """FLOPs (2 per multiply-add) of the matrix products of one forward over a batch, by part."""

    vision: float = 0.0  # vision tower (patch embedding, blocks, merger or projector), every image of the batch
    vision_head: float = 0.0  # SigLIP's pooling head: transformers runs it, the graph (which never needs it) does not
    vision_attention: float = 0.0  # q.k and weights.v inside the vision blocks (each image or tile attends to itself)
    layer: float = 0.0  # one decoder layer's projections and MLP, every token of the batch
    layer_attention: float = 0.0  # one decoder layer's q.k and weights.v over the causal pairs
    partial: float = 0.0  # layer L*'s q, k, v projections (its attention is layer_attention)
    lm_head_position: float = 0.0  # the LM head at one position of every item
    layers: int = 0
    sequence: int = 0

    def truncated(self, deepest: int) -> float:
        """(b) and (c): vision, layers 0..L*-1, and layer L* up to its attention output."""
        return (self.vision + self.vision_attention + deepest * (self.layer + self.layer_attention)
                + self.partial + self.layer_attention)

    def full(self, positions: int | None = None) -> float:
        """(a): vision (with the pooling head), every layer, the LM head at `positions` (default: every position)."""
        positions = self.sequence if positions is None else positions
        return (self.vision + self.vision_head + self.vision_attention + self.layers * (self.layer + self.layer_attention)
                + self.lm_head_position * positions)


def compute_work(config: Any, batch: int, sequence: int, images: list[int], causal: bool = True) -> Work:
    """The Work of one batch of `batch` items of `sequence` tokens each (no padding), whose images have `images`
    vision units each: patches per image for Qwen2-VL, tiles per image for LLaVA-OneVision (SigLIP).

    `config` is the transformers config of the whole model. causal=True counts the decoder's attention over the
    (query, key) pairs a causal query uses, S(S+1)/2; False over the full square, as eager attention computes it."""
    text = config.get_text_config(decoder=True)
    hidden, heads, kv_heads = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    tokens = batch * sequence
    qkv = hidden * (heads + 2 * kv_heads) * head_dim
    work = Work(layers=text.num_hidden_layers, sequence=sequence)
    work.partial = 2 * tokens * qkv
    work.layer = 2 * tokens * (qkv + heads * head_dim * hidden + 3 * hidden * text.intermediate_size)
    pairs = sequence * (sequence + 1) / 2 if causal else sequence * sequence
    work.layer_attention = 2 * 2 * batch * heads * head_dim * pairs
    work.lm_head_position = 2 * batch * hidden * text.vocab_size
    vision = getattr(config, "vision_config", None)
    if not images or vision is None:
        return work
    if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        width, merge = vision.embed_dim, vision.spatial_merge_size
        patch_inputs = vision.in_chans * vision.temporal_patch_size * vision.patch_size ** 2
        block = 4 * width * width + 2 * width * int(width * vision.mlp_ratio)
        merged = merge * merge * width
        for patches in images:
            work.vision += 2 * patches * (patch_inputs * width + vision.depth * block)
            work.vision += 2 * (patches / merge ** 2) * (merged * merged + merged * vision.hidden_size)
            work.vision_attention += vision.depth * 2 * 2 * patches * patches * width
        return work
    if vision.model_type in ("siglip_vision_model", "clip_vision_model"):
        width, inner = vision.hidden_size, vision.intermediate_size
        patches = (vision.image_size // vision.patch_size) ** 2
        tiles = sum(images)
        features = len(config.vision_feature_layer) if isinstance(config.vision_feature_layer, list) else 1
        block = 4 * width * width + 2 * width * inner
        work.vision = 2 * tiles * patches * (vision.num_channels * vision.patch_size ** 2 * width
                                             + vision.num_hidden_layers * block
                                             + features * width * hidden + hidden * hidden)
        work.vision_attention = tiles * vision.num_hidden_layers * 2 * 2 * patches * patches * width
        if getattr(vision, "vision_use_head", False):
            # one probe query: q and output projections and MLP on 1 token, k and v on every patch, its attention
            work.vision_head = 2 * tiles * (2 * width * width + 2 * patches * width * width + 2 * width * inner
                                            + 2 * patches * width)
        return work
    raise SystemExit(f"no FLOP count for vision tower {vision.model_type!r}")


# -- machine and memory ---------------------------------------------------------------------------------------------






def machine_info(threads: int) -> dict[str, Any]:
    versions = {}
    for package in ("torch", "transformers", "onnxruntime", "numpy"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    return {**machine_description(), **versions, "threads": threads, "load_average_start": os.getloadavg(), "other_benchmarks": busy_neighbours()}


def busy_neighbours() -> list[str]:
    """Other benchmark or evaluation processes running now (their load distorts absolute times, not ratios)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = status.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        waiting = command.startswith("flock ")  # queued for the shared lock, not running
        if any(name in command for name in ("bench_build", "eval_real")) and not waiting and str(os.getpid()) != status.parent.name:
            found.append(command.strip()[:120])
    return found




# -- workers: one process per method --------------------------------------------------------------------------------


def worker_main(spec: dict[str, Any]) -> None:
    """A method's process: load, say ready, then answer one JSON command per line until told to exit."""
    started = time.perf_counter()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to the log, not into the replies
    method = spec["method"]
    runner = RUNNERS[method](spec)
    ready = {"import_s": runner.imported_at - started, "load_s": runner.loaded_at - runner.imported_at,
             "rss_after_load": rss("VmRSS"), "peak_rss_load": rss("VmHWM"), **runner.describe()}
    ready["rss_anonymous_after_load"], ready["rss_file_after_load"] = rss("RssAnon"), rss("RssFile")
    replies.write(json.dumps(ready) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "exit":
            break
        if command["op"] == "reset_peak":
            reply = {"reset": reset_peak_rss(), "rss": rss("VmRSS")}
        elif command["op"] == "peak":  # RssFile: pages of mapped files (weights mapped from disk), shared with others
            reply = {"peak_rss": rss("VmHWM"), "rss": rss("VmRSS"), "rss_anonymous": rss("RssAnon"), "rss_file": rss("RssFile")}
        elif command["op"] == "profile":
            reply = runner.profile(command["batch"], command.get("deepest"), command.get("top", 12))
        else:
            reply = runner.run(command["batch"], command.get("deepest"), command.get("vectors", False))
        replies.write(json.dumps(reply) + "\n")


def watch_vision(model: Any, units: list[int]) -> None:
    """Append to `units`, at every call of the model's vision tower, what compute_work needs: patches per image
    (Qwen2-VL's grid_thw) or tiles (SigLIP and CLIP towers, after the anyres tiles are gathered)."""
    tower = next((module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in ("visual", "vision_tower")), None)
    if tower is None:
        return

    def record(module: Any, args: tuple, kwargs: dict) -> None:
        grid = kwargs.get("grid_thw")
        if grid is not None:  # (images, 3): (t, h, w) patches
            units.extend(int(t * h * w) for t, h, w in grid.tolist())
        else:  # (tiles, C, H, W)
            units.append(int((args[0] if args else kwargs["pixel_values"]).shape[0]))

    tower.register_forward_pre_hook(record, with_kwargs=True)


class _TorchRunner:
    def __init__(self, spec: dict[str, Any]):
        import torch

        torch.set_num_threads(spec["threads"])
        # transformers imports lazily: touch what load_model uses so that its import counts as import, not load
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText  # noqa: F401

        from savpack.data import Example
        from savpack.models import load_model

        self.imported_at = time.perf_counter()
        self.torch = torch
        self.model = load_model(spec["model"], device="cpu", dtype="float32")
        self.items = [Example(item["text"], tuple(item["images"]), None, f"item {index}") for index, item in enumerate(spec["items"])]
        self.template = spec["template"]
        self.setup(spec)
        self.loaded_at = time.perf_counter()

    def setup(self, spec: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"parameters": sum(p.numel() for p in self.model.model.parameters())}


class FullRunner(_TorchRunner):
    """(a): the processor, then the whole model with its LM head, as plain transformers runs it."""

    def setup(self, spec: dict[str, Any]) -> None:
        self.vision_units: list[int] = []
        watch_vision(self.model.model, self.vision_units)

    def run(self, batch: int, deepest: int | None, vectors: bool) -> dict[str, Any]:
        from savpack_runtime.images import load_image

        loaded, items = self.model, self.items[:batch]
        self.vision_units.clear()
        begin = time.perf_counter()
        prompts = [loaded.render(self.template, item.text, len(item.images)) for item in items]
        inputs = loaded.encode(prompts, [[load_image(path) for path in item.images] for item in items])
        forward_begin = time.perf_counter()
        with self.torch.inference_mode():
            output = loaded.model(**inputs)
        predicted = output.logits[:, -1].argmax(-1).tolist()
        end = time.perf_counter()
        return {"e2e_s": end - begin, "forward_s": end - forward_begin, "sequence": int(inputs["input_ids"].shape[1]),
                "padding": int((inputs["attention_mask"] == 0).sum()), "vision_units": list(self.vision_units),
                "logits_shape": list(output.logits.shape), "next_token": predicted}


class TruncatedRunner(_TorchRunner):
    """(b): savpack.pipeline.classify with the pack of L* (extract stops inside layer L*), vote included."""

    def setup(self, spec: dict[str, Any]) -> None:
        from savpack_runtime import Pack

        self.packs = {int(deepest): Pack.load(path) for deepest, path in spec["packs"].items()}
        self.forward_s = 0.0
        base = self.model.model.base_model
        forward = base.forward

        def timed_forward(*args: Any, **kwargs: Any) -> Any:
            begin = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:  # extract ends the forward with an exception once layer L*'s heads are captured
                self.forward_s += time.perf_counter() - begin

        base.forward = timed_forward

    def run(self, batch: int, deepest: int | None, vectors: bool) -> dict[str, Any]:
        from savpack.pipeline import classify

        self.forward_s = 0.0
        begin = time.perf_counter()
        result = classify(self.model, self.packs[deepest], self.items[:batch], batch_size=batch, progress=False)
        end = time.perf_counter()
        reply = {"e2e_s": end - begin, "forward_s": self.forward_s, "labels": result.labels}
        if vectors:
            reply["vectors"] = result.extraction.vectors.tolist()
        return reply

    def profile(self, batch: int, deepest: int | None, top: int) -> dict[str, Any]:
        """Where one run's time goes: torch operators by self CPU time (after the run already warmed up)."""
        from torch.profiler import ProfilerActivity, profile

        self.run(batch, deepest, False)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            reply = self.run(batch, deepest, False)
        rows = [(event.key, event.self_cpu_time_total / 1e6, event.count) for event in profiler.key_averages()]
        return {**reply, "operators": operator_shares(rows, top)}


class RuntimeRunner:
    """(c): savpack_runtime.Classifier on the bundle of L*; no torch, transformers or onnx in this process."""

    def __init__(self, spec: dict[str, Any]):
        from savpack_runtime import Classifier

        self.threads = spec["threads"]
        self.imported_at = time.perf_counter()
        self.classifier = Classifier.load(spec["bundle"], threads=spec["threads"], batch_size=8)
        self.loaded_at = time.perf_counter()
        self.items = [{"text": item["text"], "images": item["images"]} for item in spec["items"]]
        self.forward_s, self.outputs, self.feed = 0.0, [], None
        session = self.classifier.session
        run = session.run_all

        def timed_run(feed: dict, names=None) -> Any:
            self.feed = feed
            begin = time.perf_counter()
            outputs = run(feed, names)
            self.forward_s += time.perf_counter() - begin
            self.outputs.append(outputs[session.output_names[0]])  # the head vectors
            return outputs

        session.run_all = timed_run

    def describe(self) -> dict[str, Any]:
        graph = self.classifier.bundle.graph
        banned = sorted({name.split(".")[0] for name in sys.modules if name.split(".")[0] in ("torch", "transformers", "onnx")})
        return {"weights_bytes": int(graph["data_bytes"]), "deepest": max(layer for layer, _ in graph["heads"]),
                "providers": self.classifier.providers, "load_parts_s": self.classifier.load_seconds, "banned_imports": banned}

    def run(self, batch: int, deepest: int | None, vectors: bool) -> dict[str, Any]:
        import numpy as np

        self.forward_s, self.outputs = 0.0, []
        begin = time.perf_counter()
        results = self.classifier.classify_batch(self.items[:batch], batch_size=batch)
        end = time.perf_counter()
        reply = {"e2e_s": end - begin, "forward_s": self.forward_s, "labels": [result.label for result in results]}
        if vectors:
            reply["vectors"] = np.concatenate(self.outputs).tolist()  # items share one length: batch order = item order
        return reply

    def profile(self, batch: int, deepest: int | None, top: int) -> dict[str, Any]:
        """Where one run's time goes: onnxruntime nodes by operator type, from its own profiler, on a session
        opened like the runtime's own (which is closed first: memory for one copy of the weights only)."""
        import onnxruntime

        self.run(batch, deepest, False)  # captures the feed of this batch
        graph = self.classifier.session
        graph.session = None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"bench-classify-ort-{os.getpid()}")
        session = onnxruntime.InferenceSession(str(graph.path), options, providers=["CPUExecutionProvider"])
        session.run(None, self.feed)  # warm-up
        begin = time.perf_counter()
        session.run(None, self.feed)
        forward = time.perf_counter() - begin
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text())
        trace.unlink()
        node_events = [event for event in events if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")]
        warm = node_events[len(node_events) // 2:]  # the second of the two runs
        totals: dict[str, list[float]] = {}
        for event in warm:
            total = totals.setdefault(event["args"]["op_name"], [0.0, 0])
            total[0] += event["dur"] / 1e6
            total[1] += 1
        rows = [(name, seconds, count) for name, (seconds, count) in totals.items()]
        return {"forward_s": forward, "operators": operator_shares(rows, top)}


def operator_shares(rows: list[tuple[str, float, int]], top: int) -> list[dict[str, Any]]:
    """The `top` operators by time, from (name, seconds, calls) rows, with each one's share of the total."""
    total = sum(seconds for _, seconds, _ in rows) or 1.0
    rows = sorted(rows, key=lambda row: -row[1])[:top]
    return [{"operator": name, "seconds": seconds, "share": seconds / total, "calls": calls} for name, seconds, calls in rows]


RUNNERS = {"full": FullRunner, "truncated": TruncatedRunner, "runtime": RuntimeRunner}


class Worker:
    """The benchmark's side of a method's process: start it, wait for it to load, send commands."""

    def __init__(self, spec: dict[str, Any], log: Path, threads: int, wait: bool = True):
        self.method = spec["method"]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
        self.log = log
        with open(log, "ab") as handle:
            self.process = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=handle, text=True, env=env)
        self.ready: dict[str, Any] = {}
        if wait:
            self.wait()

    def wait(self) -> "Worker":
        """Wait until the process has loaded; its reply (import and load time, RSS) is `ready`."""
        if not self.ready:
            self.ready = self._read()
        return self

    def _read(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            tail = self.log.read_text(errors="replace").strip().splitlines()[-15:]
            raise SystemExit(f"{self.method} worker failed (exit {self.process.returncode}); log {self.log}:\n" + "\n".join(tail))
        return json.loads(line)

    def request(self, **command: Any) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.process.stdin.close()
            except BrokenPipeError:
                pass
            self.process.wait(timeout=120)


# -- preparing a case: model, items, packs, bundles -----------------------------------------------------------------


def model_folder(case: Case, cache: Path, workdir: Path) -> Path:
    kind, _, name = case.model.partition(":")
    if kind == "fixture":
        from savpack.testing import build_fixture

        return build_fixture(name, workdir / f"model-{name}", seed=0)
    return real_size_folder(name, cache)


def write_items(case: Case, folder: Path, count: int) -> list[dict[str, Any]]:
    """`count` items: distinct photos (ants and bees from the shared data, resized to the case's size) with one
    question, so every item has the same tokens count and a batch needs no padding; or one sentence, for text."""
    if case.image is None:
        return [{"text": TEXT, "images": []} for _ in range(count)]
    import csv

    from PIL import Image

    root = DATA / "hymenoptera_ants_bees"
    rows = [row for row in csv.DictReader((root / "labels.csv").open()) if row["split"] == "val"]
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for index, row in enumerate(rows[:: max(1, len(rows) // count)][:count]):
        target = folder / f"{case.slug}-{index}.png"
        Image.open(root / row["path"]).convert("RGB").resize(case.image, Image.BICUBIC).save(target)
        items.append({"text": QUESTION, "images": [str(target)]})
    return items


def prepare_main(spec: dict[str, Any]) -> None:
    """In a child process, with the model loaded once: one pack per L* (k random heads in layers 0..L*, one of them
    in L*; random centroids), and its bundle by savpack export's own code (export_bundle: trace, validate, write),
    unless `out` already holds the bundle exported for this very pack."""
    import numpy as np

    from savpack.export.bundle import export_bundle
    from savpack.models import load_model
    from savpack.pipeline import prompt_metadata
    from savpack_runtime import Pack
    from savpack_runtime.bundle import BUNDLE_FILE, file_sha256

    loaded = load_model(spec["model"], device="cpu", dtype="float32")
    layers, heads, head_dim = loaded.grid
    out = Path(spec["out"])
    prompt = prompt_metadata(loaded, spec["template"], 1 if spec["image"] else 0)
    prepared = {}
    for deepest in depths(layers, tuple(spec["fractions"])):
        rng = np.random.default_rng(deepest)
        forced = (deepest, int(rng.integers(heads)))
        others = [(layer, head) for layer in range(deepest + 1) for head in range(heads) if (layer, head) != forced]
        k = min(K, len(others) + 1)
        chosen = [forced] + [others[i] for i in rng.choice(len(others), size=k - 1, replace=False)]
        pack = Pack(heads=np.array(sorted(chosen), np.int32), centroids=rng.normal(size=(k, len(LABELS), head_dim)).astype(np.float32),
                    head_scores=np.ones(k, np.float32), class_counts=np.ones(len(LABELS), np.int32),
                    all_head_scores=np.zeros((layers, heads), np.float32), labels=LABELS, model=loaded.model_metadata(),
                    prompt=prompt, name=f"bench/{spec['slug']}-L{deepest}", created_by={"made_by": "tools/bench_classify.py"},
                    selection={"k": k, "scoring": "paper", "vote": "majority", "heads": f"random in layers 0..{deepest}, one in {deepest}"})
        pack_file, bundle = out / f"L{deepest}.safetensors", out / f"L{deepest}-bundle"
        pack.save(pack_file, force=True)
        entry = {"pack": str(pack_file), "bundle": str(bundle), "reused": False}
        info_file = bundle / BUNDLE_FILE
        if info_file.exists() and [p["sha256"] for p in json.loads(info_file.read_text()).get("packs", [])] == [file_sha256(pack_file)]:
            entry["reused"] = True
        else:
            weights = sum(path.stat().st_size for path in Path(spec["model"]).glob("*.safetensors"))  # a bundle holds less
            if shutil.disk_usage(out).free < weights + (2 << 30):
                raise SystemExit(f"{out}: less free disk than a bundle of this model may need ({weights / 2**30:.1f} GB + 2 GB)")
            begin = time.perf_counter()
            result = export_bundle(loaded, [pack], bundle, names=[pack.name], force=True,
                                   echo=lambda line: print(f"   {line}", file=sys.stderr))
            entry.update(export_s=time.perf_counter() - begin, validation_max_difference=result.validation.max_difference)
        entry["bytes"] = sum(path.stat().st_size for path in bundle.rglob("*") if path.is_file())
        prepared[deepest] = entry
    print(json.dumps({"prepared": prepared, "grid": list(loaded.grid)}))


# -- measuring a case -----------------------------------------------------------------------------------------------


def measure_case(case: Case, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    case_dir = workdir / case.slug
    case_dir.mkdir(parents=True)
    log = case_dir / "workers.log"
    model = model_folder(case, args.cache, workdir)
    items = write_items(case, case_dir / "items", max(plan.batch for plan in case.plans))
    template = "{text}"
    fractions = tuple(sorted({fraction for plan in case.plans for fraction in plan.fractions}))
    stored = args.cache / "bundles" / case.model.split(":")[1] if case.real else case_dir / "bundles"
    stored.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    with open(log, "ab") as handle:
        made = subprocess.run([sys.executable, __file__, "--prepare", json.dumps(
            {"model": str(model), "image": case.image is not None, "fractions": fractions, "template": template,
             "slug": case.slug, "out": str(stored)})], stdout=subprocess.PIPE, stderr=handle, text=True, env=env)
    if made.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise SystemExit(f"making packs and bundles for {case.name} failed; log {log}:\n" + "\n".join(tail))
    prepared = json.loads(made.stdout.strip().splitlines()[-1])
    bundles = {int(deepest): entry for deepest, entry in prepared["prepared"].items()}
    packs = {deepest: Path(entry["pack"]) for deepest, entry in bundles.items()}
    layers = prepared["grid"][0]
    import transformers

    config = transformers.AutoConfig.from_pretrained(model)

    common = {"model": str(model), "items": items, "template": template, "threads": args.threads}
    started = time.perf_counter()
    # (a) and (b) load one after the other, so that neither's import and load time includes the other's; tests may
    # overlap them (their load times are then not comparable)
    overlap = getattr(args, "overlap_loads", False)
    full = Worker({**common, "method": "full"}, log, args.threads, wait=not overlap)
    truncated = Worker({**common, "method": "truncated", "packs": {str(d): str(p) for d, p in packs.items()}}, log,
                       args.threads).wait()
    full.wait()
    groups, runtime_ready, full_warm, profiles = [], {}, set(), {}
    try:
        for deepest in sorted(packs):
            runtime = Worker({**common, "method": "runtime", "bundle": bundles[deepest]["bundle"]}, log, args.threads)
            runtime_ready[deepest] = runtime.ready
            workers = {"full": full, "truncated": truncated, "runtime": runtime}
            for plan in case.plans:
                if deepest not in depths(layers, plan.fractions):
                    continue
                print(f"   L*={deepest} batch {plan.batch}", file=sys.stderr)
                for worker in workers.values():
                    worker.request(op="reset_peak")
                for method, worker in workers.items():
                    if method == "full" and plan.batch in full_warm:
                        continue  # (a) does not depend on L*: warmed once per batch size
                    for _ in range(plan.warmup):
                        worker.request(op="run", batch=plan.batch, deepest=deepest)
                full_warm.add(plan.batch)
                runs: dict[str, list[dict[str, Any]]] = {method: [] for method in workers}
                for repeat in range(plan.repeats):
                    order = METHODS[repeat % 3:] + METHODS[: repeat % 3]  # rotate: no method always runs first
                    for method in order:
                        runs[method].append(workers[method].request(op="run", batch=plan.batch, deepest=deepest, vectors=repeat == 0))
                memory = {method: worker.request(op="peak") for method, worker in workers.items()}
                groups.append(summarise(case, config, plan, deepest, layers, runs, memory, runtime.ready))
            if getattr(args, "profile", False):  # last: the runtime's profile replaces its session
                print(f"   L*={deepest} batch 1: profiling (b) and (c)", file=sys.stderr)
                profiles[str(deepest)] = {method: workers[method].request(op="profile", batch=1, deepest=deepest)
                                          for method in ("truncated", "runtime")}
            runtime.close()
    finally:
        for worker in (full, truncated):
            worker.close()
    return {"case": case.name, "model": case.model, "image": case.image, "note": case.note, "layers": layers,
            "grid": prepared["grid"], "k": K, "bundles": {str(d): info for d, info in bundles.items()},
            "workers": {"full": full.ready, "truncated": truncated.ready, "runtime": {str(d): r for d, r in runtime_ready.items()}},
            "groups": groups, "profiles": profiles, "seconds": time.perf_counter() - started, "items": len(items)}


def summarise(case: Case, config: Any, plan: Plan, deepest: int, layers: int, runs: dict[str, list[dict]],
              memory: dict[str, dict[str, int | None]], runtime_ready: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    peaks = {method: reply["peak_rss"] for method, reply in memory.items()}

    first = runs["full"][0]
    work = compute_work(config, plan.batch, first["sequence"], first["vision_units"])
    floor = work.truncated(deepest) / work.full()

    def ratio(top: str, bottom: str, key: str) -> float:
        return statistics.median(t[key] / b[key] for t, b in zip(runs[top], runs[bottom]))

    truncated_vectors = np.asarray(runs["truncated"][0]["vectors"])
    runtime_vectors = np.asarray(runs["runtime"][0]["vectors"])
    difference = float(np.abs(truncated_vectors - runtime_vectors).max())
    allowed = VECTOR_TOLERANCE * (1 + np.abs(truncated_vectors))
    weights = runtime_ready["weights_bytes"]
    runtime_peak = max(value for value in (peaks["runtime"], runtime_ready["peak_rss_load"]) if value is not None)
    return {
        "batch": plan.batch, "deepest": deepest, "layers_run": deepest + 1, "depth_fraction": (deepest + 1) / layers,
        "warmup": plan.warmup, "repeats": plan.repeats, "sequence": first["sequence"], "padding": first["padding"],
        "vision_units": first["vision_units"],
        "flops": {"full": work.full(), "full_last_position_head": work.full(1), "truncated": work.truncated(deepest),
                  "parts": asdict(work)},
        "floor": floor, "floor_last_position_head": work.truncated(deepest) / work.full(1),
        "median_s": {method: {key: statistics.median(run[key] for run in runs[method]) for key in ("e2e_s", "forward_s")}
                     for method in runs},
        "ratios": {f"{top}/{bottom}": {key: ratio(top, bottom, key) for key in ("e2e_s", "forward_s")}
                   for top, bottom in (("runtime", "full"), ("truncated", "full"), ("runtime", "truncated"))},
        "peak_rss": {**peaks, "runtime_with_load": runtime_peak}, "memory_after_runs": memory, "runtime_weights_bytes": weights,
        "runtime_rss_over_weights": runtime_peak / weights,
        "same_vectors": bool((np.abs(truncated_vectors - runtime_vectors) <= allowed).all()), "max_vector_difference": difference,
        "same_labels": runs["truncated"][0]["labels"] == runs["runtime"][0]["labels"],
        "runs": {method: [{key: value for key, value in run.items() if key != "vectors"} for run in method_runs]
                 for method, method_runs in runs.items()},
    }


# -- targets and report ---------------------------------------------------------------------------------------------

LATENCY_SLACK = 1.1  # runtime latency / full-forward latency <= 1.1 x the FLOP floor
RSS_SLACK = 1.2  # runtime peak RSS <= 1.2 x the weights the runtime holds


def check_targets(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per real-size group: the issue's three targets. Tiny fixtures are reported, not judged: their forwards take
    milliseconds, so fixed per-call costs (preprocessing, Python, session overhead) dominate, not compute."""
    checks = []
    for case in cases:
        if not case["model"].startswith("real:"):
            continue
        for group in case["groups"]:
            where = f"{case['case']}, batch {group['batch']}, L*={group['deepest']}"
            latency = group["ratios"]["runtime/full"]["e2e_s"]
            checks.append({"where": where, "target": "latency (c)/(a) <= 1.1 x floor", "value": latency / group["floor"],
                           "met": latency <= LATENCY_SLACK * group["floor"]})
            if group["batch"] == 1:
                versus = group["ratios"]["runtime/truncated"]["e2e_s"]
                checks.append({"where": where, "target": "runtime not slower than the PyTorch truncated path",
                               "value": versus, "met": versus <= 1.0})
            over = group["runtime_rss_over_weights"]
            checks.append({"where": where, "target": "runtime peak RSS <= weights held + 20%", "value": over,
                           "met": over <= RSS_SLACK})
    return checks




def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"Classify one query, {machine['threads']} thread(s) per method, float32, CPU ({machine['cpu']}, {machine['cores']} cores, "
        f"shared). Ratios are medians over repeats of per-repeat ratios (methods interleaved); floor = FLOPs of (c) / FLOPs "
        "of (a); latency = end to end (preprocessing, forward, vote), forward-only in brackets.",
        "",
        "| model | batch | L\\* (layers run) | tokens | floor | (c)/(a) | (c)/(a) ÷ floor | (b)/(a) | (c)/(b) | (a) s "
        "| peak RSS GB (a) / (b) / (c) | (c) weights GB | (c) RSS ÷ weights | (b) = (c) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        for group in case["groups"]:
            ratios, peaks = group["ratios"], group["peak_rss"]
            c_a = ratios["runtime/full"]
            lines.append(
                f"| {case['case']} | {group['batch']} | {group['deepest']} ({group['layers_run']}/{case['layers']}) "
                f"| {group['sequence']} | {group['floor']:.2f} | {c_a['e2e_s']:.2f} ({c_a['forward_s']:.2f}) "
                f"| {c_a['e2e_s'] / group['floor']:.2f} | {ratios['truncated/full']['e2e_s']:.2f} "
                f"| {ratios['runtime/truncated']['e2e_s']:.2f} ({ratios['runtime/truncated']['forward_s']:.2f}) "
                f"| {group['median_s']['full']['e2e_s']:.3g} "
                f"| {gigabytes(peaks['full'])} / {gigabytes(peaks['truncated'])} / {gigabytes(peaks['runtime_with_load'])} "
                f"| {gigabytes(group['runtime_weights_bytes'])} | {group['runtime_rss_over_weights']:.2f} "
                f"| {'yes' if group['same_vectors'] and group['same_labels'] else 'NO'} |")
    lines += ["", "| model | import s: torch+savpack / runtime | load s: (a) / (b) / (c) median | (c) graph load, L* deepest |",
              "|---|---|---|---|"]
    for case in report["cases"]:
        workers = case["workers"]
        runtime = list(workers["runtime"].values())
        lines.append(
            f"| {case['case']} | {workers['full']['import_s']:.2f} / {statistics.median(r['import_s'] for r in runtime):.2f} "
            f"| {workers['full']['load_s']:.2f} / {workers['truncated']['load_s']:.2f} / "
            f"{statistics.median(r['load_s'] for r in runtime):.2f} | {runtime[-1]['load_s']:.2f} |")
    for case in report["cases"]:
        for deepest, profile in case.get("profiles", {}).items():
            lines += ["", f"{case['case']}, L*={deepest}, batch 1: where the forward's time goes (operator: share of "
                          "the profiled time; forward s)", "",
                      "| (b) PyTorch truncated | (c) onnxruntime |", "|---|---|"]
            tops = [[f"{row['operator']}: {row['share']:.0%}" for row in profile[method]["operators"][:6]]
                    for method in ("truncated", "runtime")]
            lines += [f"| {left} | {right} |" for left, right in zip(*tops)]
            lines.append(f"| forward {profile['truncated']['forward_s']:.3g} s | forward {profile['runtime']['forward_s']:.3g} s |")
    if report["targets"]:
        lines += ["", "| target | where | value | met |", "|---|---|---|---|"]
        lines += [f"| {check['target']} | {check['where']} | {check['value']:.2f} | {'yes' if check['met'] else 'NO'} |"
                  for check in report["targets"]]
    return "\n".join(lines)




def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny fixtures only (< 3 minutes)")
    parser.add_argument("--extended", action="store_true",
                        help="real sizes at every L* and batch 8 with larger photos (hours on this machine)")
    parser.add_argument("--only", default=None, help="run only cases whose name contains this text")
    parser.add_argument("--profile", action="store_true",
                        help="after each L*'s measurements, profile (b) and (c) at batch 1: time by operator")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per method, torch and onnxruntime alike (default 1: on the shared 2-core machine "
                             "two threads spin against other jobs)")
    parser.add_argument("--cache", type=Path, default=cache_dir("bench-classify"), help="real-size models and bundles (default: the user cache)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results to write (required)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.out is None and not (args.worker or args.prepare):
        parser.error("--out JSON is required (where the results go)")
    return args


def selected_cases(args: argparse.Namespace) -> list[Case]:
    cases = list(TINY) + ([] if args.quick else list(EXTENDED if args.extended else REAL))
    cases = [case for case in cases if not args.only or args.only.lower() in case.name.lower()]
    if not cases:
        raise SystemExit(f"no case matches --only {args.only!r}")
    return cases


def run_benchmark(args: argparse.Namespace, cases: list[Case]) -> dict[str, Any]:
    """Every case measured (three methods, one process each), with the machine's state and the targets checked."""
    machine = machine_info(args.threads)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-classify-") as tmp:
        for case in cases:
            if case.real:
                args.cache.mkdir(parents=True, exist_ok=True)
                print(f"== {case.name}: load {os.getloadavg()[0]:.1f}, {memory_available() / 2**30:.1f} GB available, "
                      f"other benchmarks: {len(busy_neighbours())}", file=sys.stderr)
            else:
                print(f"== {case.name}", file=sys.stderr)
            results.append(measure_case(case, args, Path(tmp)))
    machine["load_average_end"] = os.getloadavg()
    machine["total_seconds"] = time.perf_counter() - started
    report = {"benchmark": "classify", "mode": "quick" if args.quick else "extended" if args.extended else "full",
              "machine": machine, "cases": results}
    report["targets"] = check_targets(results)
    return report


def main() -> None:
    args = parse_args()
    if args.worker:  # one method's long-lived child process
        worker_main(json.loads(args.worker))
        return
    if args.prepare:  # the child process that builds a case's packs and bundles
        prepare_main(json.loads(args.prepare))
        return
    report = run_benchmark(args, selected_cases(args))
    write_results(args.out, report)
    print(f"wrote {args.out} ({report['machine']['total_seconds']:.0f} s)", file=sys.stderr)
    print(markdown(report))


if __name__ == "__main__":
    main()
