"""Write a bundle: the truncated graph, the packs it serves, the preprocessing files, bundle.json.

The folder is assembled in a temporary folder beside the destination, checked by the runtime's own reader and
session, validated against the model, and only then renamed into place: a failed or interrupted export never leaves
a half-written bundle, and an existing bundle is replaced only with force=True.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from savpack_runtime import bundle as fmt
from savpack_runtime import files, graph_inputs
from savpack_runtime.items import Example
from savpack_runtime.pack import Pack
from savpack_runtime.preprocess import SPEC_FILE, TOKENIZER_FILE
from savpack_runtime.session import GraphSession

from ..errors import ExportError
from ..models import LoadedModel
from ..pipeline import check_pack_fits, producer_versions
from ..preprocess_spec import write_preprocessing
from . import onnx_graph, require_export_extra
from .forward import GraphModule, build_graph_module
from .quantize import (DEFAULT_MIN_AGREEMENT, QUANTIZE_TYPES, QuantizationReport, check_items_fit, check_keep_float,
                       packs_examples, quantize_bundle)
from .validate import (DEFAULT_TOLERANCE, EXAMPLE_SIZES, FLOAT16_TOLERANCE, ValidationReport, check_tolerance, encode_examples,
                       make_examples, validate_graph)


@dataclass
class ExportResult:
    folder: Path
    info: dict[str, Any]  # bundle.json
    validation: ValidationReport
    sizes: dict[str, int] = field(default_factory=dict)  # file (relative) -> bytes
    seconds: dict[str, float] = field(default_factory=dict)  # step -> wall time
    quantization: QuantizationReport | None = None  # the int8 check, when the graph was quantized


def union_heads(packs: Sequence[Pack]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The graph's heads (first pack's order, then each later pack's new heads) and each pack's positions in it."""
    order: list[tuple[int, int]] = []
    for pack in packs:
        order += [head for head in map(tuple, pack.heads.tolist()) if head not in order]
    index = {head: position for position, head in enumerate(order)}
    positions = [np.array([index[head] for head in map(tuple, pack.heads.tolist())], dtype=np.int64) for pack in packs]
    return np.array(order, dtype=np.int64).reshape(-1, 2), positions


def pack_file_names(names: Sequence[str]) -> list[str]:
    """packs/<name>.safetensors with the name reduced to safe characters; refuses two packs of one name."""
    files = [f"{fmt.PACKS_FOLDER}/{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-.') or 'pack'}.safetensors" for name in names]
    if len(set(files)) != len(files):
        raise ExportError(f"packs {list(names)} would share a file name in the bundle; give them distinct names")
    return files


def check_packs_agree(packs: Sequence[Pack], names: Sequence[str]) -> None:
    """One bundle serves one model and one prompt: every pack must share both with the first."""
    first = packs[0]
    for name, pack in zip(names[1:], packs[1:]):
        fmt.check_model(pack.model, first.model, f"pack {name!r}", f"pack {names[0]!r}")
        for key in ("rendered", "image_count"):
            if pack.prompt[key] != first.prompt[key]:
                raise ExportError(f"pack {name!r} has prompt {key} {pack.prompt[key]!r}, pack {names[0]!r} "
                                  f"{first.prompt[key]!r}; packs in one bundle must share one prompt (one forward)")
        if pack.token_position != first.token_position:
            raise ExportError(f"pack {name!r} reads heads at the {pack.token_position} token, pack {names[0]!r} at the "
                              f"{first.token_position}; packs in one bundle must read the same token (one graph output)")


def export_bundle(loaded: LoadedModel, packs: Sequence[Pack], out: str | Path, names: Sequence[str] | None = None,
                  fp16: bool = False, selected_heads_only: bool = False, force: bool = False,
                  exporter: str = "torchscript", tolerance: float | None = None, echo=None, scores: bool = True,
                  quantize: str | None = None, examples: Sequence[Example] = (), per_channel: bool = True,
                  min_agreement: float = DEFAULT_MIN_AGREEMENT, check_items: Sequence[Example] = (),
                  keep_float: str | None = None) -> ExportResult:
    """Export the graph for `packs` (one model, one prompt) and write the bundle folder `out`.

    scores: the packs' votes inside the graph (bundle format 2, the default: measured to cost nothing, docs/export.md);
    False writes a format-1 bundle whose graph returns head vectors only (the runtime then votes in numpy).
    quantize "int8": the validated float32 graph is quantized (savpack.export.quantize) and kept only if each pack
    labels its own examples (found among `examples`) as the float32 graph does, at least `min_agreement` of them, and
    every pack labels the held-out `check_items` (labelled or not) as the float32 graph does, as many of them.
    keep_float: with quantize, "auto" (the default with `examples`: the MatMul groups that disturb the packs' own
    examples most stay float32) or "none" (every weight MatMul int8; the default without `examples`)."""
    say = echo or (lambda message: None)
    out = Path(out)
    require_export_extra()
    names = check_export(loaded, packs, names, out, force)
    own_examples = check_quantize(packs, names, quantize, fp16, examples, check_items)
    if quantize is not None:
        keep_float = check_keep_float(keep_float, own_examples)
    elif keep_float is not None:
        raise ExportError("keep_float goes with quantize='int8'")
    tolerance = check_tolerance(tolerance) if tolerance is not None else (FLOAT16_TOLERANCE if fp16 else DEFAULT_TOLERANCE)
    prompt = packs[0].prompt
    heads, positions = union_heads(packs)
    seconds: dict[str, float] = {}
    version = fmt.FORMAT_VERSION if scores else 1

    started = time.perf_counter()
    graph = build_graph_module(loaded, heads, int(prompt["image_count"]), selected_heads_only, packs[0].token_position)
    graph = graph.scored(packs, positions) if scores else graph
    say(f"exporting layers 0..{int(heads[:, 0].max())} of {loaded.model_id} ({graph.kind} graph, {len(heads)} heads) with the {exporter} exporter")
    quantization = None
    with files.staged_folder(out, force, marker=fmt.BUNDLE_FILE, inputs=[loaded.model_id]) as work:
        metadata = fmt.graph_metadata(packs[0].model, heads, [pack.content_hash() for pack in packs], version)
        saved = write_graph(loaded, graph, prompt, work, metadata, exporter, fp16)
        seconds["export"] = time.perf_counter() - started
        pack_files = write_packs(work, packs, names)
        write_preprocessing(loaded, prompt, work)  # checks the runtime reproduces the builder's inputs first
        info = bundle_info(work, packs, names, pack_files, positions, graph, heads, fp16, exporter, version)
        (work / fmt.BUNDLE_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")

        started = time.perf_counter()
        say(f"validating against {loaded.model_id} on fresh inputs (tolerance {tolerance:g})")
        report = read_back_and_validate(work, loaded, graph, heads, prompt, tolerance, list(zip(packs, positions)) if scores else [])
        seconds["validate"] = time.perf_counter() - started
        if quantize is not None:
            started = time.perf_counter()
            quantization = quantize_bundle(work, names, own_examples, per_channel, min_agreement, say, check_items,
                                           keep_float)
            info = json.loads((work / fmt.BUNDLE_FILE).read_text(encoding="utf-8"))
            seconds["quantize"] = time.perf_counter() - started
        sizes = {str(path.relative_to(work)): path.stat().st_size for path in sorted(work.rglob("*")) if path.is_file()}
    if saved:
        say(f"float16 weights saved {saved / 1e6:.1f} MB")
    return ExportResult(out, info, report, sizes, seconds, quantization)


def check_export(loaded: LoadedModel, packs: Sequence[Pack], names: Sequence[str] | None, out: Path, force: bool) -> list[str]:
    """Everything that can be refused before tracing: the packs, their names, the destination, the model's
    placement, and that every pack fits the model. Returns the packs' names."""
    if not packs:
        raise ExportError("give at least one pack to export")
    names = list(names) if names is not None else [pack.name or f"pack{index}" for index, pack in enumerate(packs)]
    if len(names) != len(packs):
        raise ExportError(f"{len(names)} names for {len(packs)} packs")
    # Never over the model folder or anything savpack did not write (a bundle holds bundle.json).
    files.check_output_folder(out, force, marker=fmt.BUNDLE_FILE, inputs=[loaded.model_id])
    if loaded.dtype != torch.float32 or loaded.device.type != "cpu":
        raise ExportError(f"{loaded.model_id} is loaded as {loaded.dtype} on {loaded.device}; export traces and "
                          "validates in float32 on the CPU (load with device='cpu', dtype='float32'; fp16=True halves the weights)")
    check_packs_agree(packs, names)
    for pack in packs:
        check_pack_fits(pack, loaded)
    pack_file_names(names)  # refuses names that collide as file names, before any work
    return names


def check_quantize(packs: Sequence[Pack], names: Sequence[str], quantize: str | None, fp16: bool,
                   examples: Sequence[Example], check_items: Sequence[Example] = ()) -> dict[str, list[Example]]:
    """With `quantize`: refuses what cannot be quantized and returns each pack's own examples among `examples`
    (none given: no such check, when held-out `check_items` are)."""
    if quantize is None:
        if check_items:
            raise ExportError("check items go with quantize='int8': they compare the int8 graph's labels with float32's")
        return {}
    if quantize not in QUANTIZE_TYPES:
        raise ExportError(f"--quantize {quantize!r} is not one of {QUANTIZE_TYPES}")
    if fp16:
        raise ExportError("--fp16 and --quantize int8 exclude each other: int8 replaces the float32 weights")
    check_items_fit(check_items, int(packs[0].prompt["image_count"]))
    if not examples and check_items:
        return {}
    return packs_examples(packs, names, examples)


def write_graph(loaded: LoadedModel, graph: GraphModule, prompt: dict[str, Any], work: Path, metadata: dict[str, str],
                exporter: str, fp16: bool) -> int:
    """Trace `graph` on example inputs of the packs' prompt and save it (its weights as external data) into `work`;
    returns the bytes float16 weights saved."""
    image_count = int(prompt["image_count"])
    with tempfile.TemporaryDirectory(prefix="savpack-example-") as tmp:
        example = make_examples(3, image_count, EXAMPLE_SIZES, Path(tmp), seed=7, extra_image_item=0 if image_count else None)
        feed = graph_inputs.plan(graph.kind, graph.plan_config, encode_examples(loaded, example, prompt["template"]))
    # The traced graph's own folder, beside the bundle (same disk): large weights stay in its files until saved.
    with tempfile.TemporaryDirectory(prefix=f".{work.name}.", suffix=".trace", dir=work.parent) as traced:
        model = onnx_graph.trace_to_onnx(graph, feed, Path(traced), exporter)
        saved = onnx_graph.float16_weights(model, Path(traced)) if fp16 else 0
        onnx_graph.finish(model, metadata)
        onnx_graph.save(model, work / fmt.GRAPH_FILE, Path(traced))
    return saved


def write_packs(work: Path, packs: Sequence[Pack], names: Sequence[str]) -> list[str]:
    """Each pack into packs/; returns their file names (relative to the bundle)."""
    pack_files = pack_file_names(names)
    (work / fmt.PACKS_FOLDER).mkdir()
    for pack, file in zip(packs, pack_files):
        pack.save(work / file)
    return pack_files


def bundle_info(work: Path, packs: Sequence[Pack], names: Sequence[str], pack_files: Sequence[str],
                positions: Sequence[np.ndarray], graph: GraphModule, heads: np.ndarray, fp16: bool, exporter: str,
                version: int = fmt.FORMAT_VERSION) -> dict[str, Any]:
    """bundle.json for the files written into `work` (their digests read from disk). Format 2 lists each pack's
    labels, its scores' graph outputs and whether it is calibrated; format 1 (a graph without the vote) none of them."""
    return {
        "format": fmt.FORMAT_NAME, "format_version": version,
        "model": dict(packs[0].model), "prompt": packs[0].prompt,
        "graph": {
            "file": fmt.GRAPH_FILE, "sha256": fmt.file_sha256(work / fmt.GRAPH_FILE),
            "data_file": fmt.GRAPH_DATA_FILE, "data_bytes": (work / fmt.GRAPH_DATA_FILE).stat().st_size,
            "data_sha256": fmt.file_sha256(work / fmt.GRAPH_DATA_FILE),
            "kind": graph.kind, "plan": graph.plan_config,
            "inputs": list(graph.input_names), "output": graph_inputs.OUTPUT_NAME, "outputs": list(graph.output_names),
            "dynamic_axes": {name: {str(axis): label for axis, label in graph_inputs.GRAPH_INPUTS[graph.kind][name].items()}
                             for name in graph.input_names},
            "opset": onnx_graph.OPSET, "heads": heads.tolist(),
            "weights": "float16" if fp16 else "float32", "selected_heads_only": graph.selected_heads_only,
        },
        "packs": [{"file": file, "sha256": fmt.file_sha256(work / file), "name": name, "positions": position.tolist(),
                   **({"labels": list(pack.labels), "outputs": graph_inputs.score_outputs(index),
                       fmt.PACK_CALIBRATED: pack.scoring_model is not None} if version >= 2 else {})}
                  for index, (pack, file, name, position) in enumerate(zip(packs, pack_files, names, positions))],
        "preprocessing": {"files": {name: fmt.file_sha256(work / name) for name in (SPEC_FILE, TOKENIZER_FILE)}},
        "created_by": {**producer_versions(), "exporter": exporter, **_export_versions()},
    }


def read_back_and_validate(work: Path, loaded: LoadedModel, graph: GraphModule, heads: np.ndarray, prompt: dict[str, Any],
                           tolerance: float, packs: Sequence[tuple[Pack, np.ndarray]] = ()) -> ValidationReport:
    """Read the written folder with the runtime's own reader and session (never ship what the runtime would refuse),
    then compare the graph with the model on fresh inputs (and each pack's in-graph vote with the numpy vote)."""
    written = fmt.Bundle.load(work, check_weights=True)
    session = GraphSession(written.graph_path, "cpu")
    fmt.check_graph_metadata(written, session.metadata)
    return validate_graph(session, loaded, graph.kind, graph.plan_config, heads, prompt["template"],
                          int(prompt["image_count"]), tolerance, token_position=written.packs[0].pack.token_position,
                          packs=packs)


def _export_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


