"""The bundle format: every name a bundle writer or reader needs, in one place, and the strict reader.

A bundle is a folder that `savpack export` writes and the runtime loads:

    bundle.json          what is inside and how it fits together (BUNDLE_FIELDS, GRAPH_FIELDS, PACK_FIELDS)
    graph.onnx           the truncated graph; returns OUTPUT_NAME (batch, k, head_dim) for the heads listed in
    graph.onnx.data      bundle.json "graph.heads", then (format 2) each pack's vote; its weights as ONNX external data
    packs/<name>.safetensors   each pack, its heads' positions in the graph's output, its labels and vote outputs
    preprocess.json, tokenizer.json   the preprocessing files (savpack_runtime.preprocess reads them)

The graph also carries the model and its heads in its own metadata_props (GRAPH_META_*), so a graph moved between
bundles is still checked against the packs it serves. The writer is savpack.export.bundle; docs/export.md is the
human-readable specification.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .compat import RUNTIME_PACKAGE, version_refusal
from .errors import BundleError, BundleVersionError, ModelMismatchError, PackError
from .files import check_file, check_folder, file_sha256, read_file
from .format import DEFAULT_TOKEN_POSITION, PROMPT_TOKEN_POSITION
from .graph_inputs import GRAPH_INPUTS, OUTPUT_NAME, REQUIRED_SCORE_ROLES, SCORE_ROLES, input_names
from .pack import Pack

FORMAT_NAME = "savpack-bundle"
# 2: the graph votes (each pack's graph_inputs.SCORE_ROLES outputs), packs list their labels. The probabilities output
# and the packs' "calibrated" came later without a new version: every reader of version 2 reads such a bundle right
# (it ignores what it does not know, and `prediction` stays the pack's label), and bundles without them still load.
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)

BUNDLE_FILE = "bundle.json"
GRAPH_FILE = "graph.onnx"
GRAPH_DATA_FILE = "graph.onnx.data"
PACKS_FOLDER = "packs"
MAX_BUNDLE_JSON_BYTES = 4 * 1024 * 1024  # heads, positions and a few names: far below this

# bundle.json
BUNDLE_FIELDS = ("format", "format_version", "model", "prompt", "graph", "packs", "preprocessing", "created_by")
# model: as in a pack (id, revision, family, grid, fingerprint); prompt: the packs' shared prompt (template, rendered,
# image_count, chat_template_sha256); preprocessing: {"files": {file name: sha256}} of the preprocessing files.
GRAPH_FIELDS = (
    "file", "sha256", "data_file", "data_bytes", "data_sha256",  # files and their digests
    "kind", "plan",  # graph_inputs kind and the model constants its planner needs
    "inputs", "output", "dynamic_axes", "opset",  # the contract
    "heads",  # [[layer, head], ...] in output order
    "weights",  # "float32", "float16" (weights only; activations stay float32) or "int8" (WEIGHT_TYPES)
    "selected_heads_only",  # layer L* computes only the chosen heads at the last position
)
PACK_FIELDS = ("file", "sha256", "name", "positions")  # positions: index of each of the pack's heads in graph.heads
# Format 2: labels (the pack's, for clients that do not read safetensors) and outputs {role: graph output name} for
# each of graph_inputs.REQUIRED_SCORE_ROLES, and "probabilities" where the graph computes them (bundles written since),
# which also say PACK_CALIBRATED: whether the pack's probabilities are fitted (false: a format-1 pack's vote shares).
PACK_FIELDS_2 = PACK_FIELDS + ("labels", "outputs")
PACK_CALIBRATED = "calibrated"
# float16: weight matrices stored as float16, cast back on load; int8: weight matrices int8 with their inputs quantized
# per token in the graph (some groups may stay float32: --keep-float auto), recorded with its check and choice in
# graph.quantization.
WEIGHT_TYPES = ("float32", "float16", "int8")

# The graph's metadata_props: JSON strings.
GRAPH_META_FORMAT = "savpack.bundle_format"  # "savpack-bundle/1"
GRAPH_META_MODEL = "savpack.model"  # {id, revision, family, grid, fingerprint}
GRAPH_META_HEADS = "savpack.heads"  # [[layer, head], ...] in output order
GRAPH_META_PACKS = "savpack.packs"  # [sha256 of each pack's content], the packs this graph was exported for
GRAPH_META_KEYS = (GRAPH_META_FORMAT, GRAPH_META_MODEL, GRAPH_META_HEADS, GRAPH_META_PACKS)
MODEL_MATCH_FIELDS = ("id", "revision", "family", "grid", "fingerprint")


@dataclass
class BundlePack:
    pack: Pack
    name: str
    positions: np.ndarray  # (k,) index of each of the pack's heads in the graph output
    # role -> graph output name of the in-graph scores (graph_inputs.SCORE_ROLES; "probabilities" absent from bundles
    # written before the graph computed them); None: format 1, no vote in the graph
    outputs: dict[str, str] | None = None


@dataclass
class Bundle:
    """A validated bundle folder: its description, its packs, and where its graph lies."""

    folder: Path
    info: dict[str, Any]
    packs: list[BundlePack]

    @property
    def graph(self) -> dict[str, Any]:
        return self.info["graph"]

    @property
    def graph_path(self) -> Path:
        return self.folder / self.graph["file"]

    @property
    def heads(self) -> np.ndarray:
        return np.asarray(self.graph["heads"], dtype=np.int64).reshape(-1, 2)

    @property
    def model(self) -> dict[str, Any]:
        return self.info["model"]

    @property
    def prompt(self) -> dict[str, Any]:
        return self.info["prompt"]

    @classmethod
    def load(cls, folder: str | os.PathLike, check_weights: bool = True) -> "Bundle":
        """Read and check a bundle folder: every file against its sha256 in bundle.json, the graph's weights included
        (a full read of them). check_weights=False skips only the weights' hash (their size is still checked), for
        a bundle whose weights were verified once and are stored where nobody else writes."""
        folder = check_folder(folder, BundleError, "bundle folder")
        info = _read_info(folder / BUNDLE_FILE)
        path = folder / BUNDLE_FILE
        graph = info["graph"]
        _check_graph_fields(graph, path)
        _check_file(folder, graph["file"], graph["sha256"], path, "graph.file")
        data = _inside(folder, graph["data_file"], path, "graph.data_file")
        size = check_file(data, BundleError, f"graph weights file {graph['data_file']!r}")
        if size != graph["data_bytes"]:
            raise BundleError(f"graph weights file {graph['data_file']!r} is {size} bytes, bundle.json says "
                              f"{graph['data_bytes']} (truncated or replaced?)", path, "graph.data_bytes")

        files = info["preprocessing"].get("files")
        if not isinstance(files, dict) or not files:
            raise BundleError("'preprocessing' must name its files and their sha256", path, "preprocessing.files")
        for name, digest in files.items():
            _check_file(folder, name, digest, path, "preprocessing.files")

        heads = np.asarray(graph["heads"], dtype=np.int64).reshape(-1, 2)
        if not isinstance(info["packs"], list) or not info["packs"]:
            raise BundleError("'packs' must be a non-empty list", path, "packs")
        packs = [_load_pack(folder, entry, index, heads, info, path) for index, entry in enumerate(info["packs"])]
        names = [entry.name for entry in packs]
        if len(set(names)) != len(names):
            raise BundleError(f"pack names repeat: {names}", path, "packs")
        bundle = cls(folder, info, packs)
        if check_weights:
            bundle.check_weights()
        return bundle

    def check_weights(self) -> None:
        """Hash the graph's weights file against bundle.json (a full read: ~0.4 GB/s on one core)."""
        name = self.graph["data_file"]
        if file_sha256(self.folder / name) != self.graph["data_sha256"]:
            raise BundleError(f"graph weights file {name!r} does not match its sha256 in bundle.json (altered or "
                              "replaced; a bundle is checked in full before it classifies)", self.folder / BUNDLE_FILE,
                              "graph.data_sha256")


def _read_info(path: Path) -> dict[str, Any]:
    if not os.path.lexists(path):
        raise BundleError(f"{BUNDLE_FILE} is missing: not a bundle folder", path.parent)
    try:
        info = json.loads(read_file(path, MAX_BUNDLE_JSON_BYTES, BundleError).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"is not valid JSON: {exc}", path) from None
    if not isinstance(info, dict):
        raise BundleError("must hold a JSON object", path)
    if info.get("format") != FORMAT_NAME:
        raise BundleError(f"'format' is {info.get('format')!r}, expected {FORMAT_NAME!r}", path, "format")
    version = info.get("format_version")
    if type(version) is not int:
        raise BundleError(f"'format_version' is {version!r}, expected an integer", path, "format_version")
    refusal = version_refusal(version, SUPPORTED_VERSIONS, "bundle format version", RUNTIME_PACKAGE)
    if refusal:
        raise BundleVersionError(refusal, path, "format_version")
    missing = [key for key in BUNDLE_FIELDS if key not in info]
    if missing:
        raise BundleError(f"lacks {missing}", path, missing[0])
    for key in ("model", "prompt", "graph", "preprocessing", "created_by"):
        if not isinstance(info[key], dict):
            raise BundleError(f"'{key}' must be a JSON object", path, key)
    return info


def _check_graph_fields(graph: dict[str, Any], path: Path) -> None:
    missing = [key for key in GRAPH_FIELDS if key not in graph]
    if missing:
        raise BundleError(f"'graph' lacks {missing}", path, f"graph.{missing[0]}")
    if graph["kind"] not in GRAPH_INPUTS:
        raise BundleError(f"graph.kind {graph['kind']!r} is not one of {sorted(GRAPH_INPUTS)} (newer savpack?)", path, "graph.kind")
    if list(graph["inputs"]) != list(input_names(graph["kind"])):
        raise BundleError(f"graph.inputs {graph['inputs']} differ from the {graph['kind']} contract {list(input_names(graph['kind']))}", path, "graph.inputs")
    if graph["output"] != OUTPUT_NAME:
        raise BundleError(f"graph.output is {graph['output']!r}, expected {OUTPUT_NAME!r}", path, "graph.output")
    if graph["weights"] not in WEIGHT_TYPES:
        raise BundleError(f"graph.weights is {graph['weights']!r}, expected one of {WEIGHT_TYPES}", path, "graph.weights")
    heads = graph["heads"]
    if not (isinstance(heads, list) and heads and all(isinstance(h, list) and len(h) == 2 and all(type(v) is int and v >= 0 for v in h) for h in heads)):
        raise BundleError("graph.heads must be a non-empty list of [layer, head] pairs of non-negative integers", path, "graph.heads")
    if len({tuple(h) for h in heads}) != len(heads):
        raise BundleError("graph.heads lists a head twice", path, "graph.heads")
    if type(graph["data_bytes"]) is not int or graph["data_bytes"] < 0:
        raise BundleError("graph.data_bytes must be a non-negative integer", path, "graph.data_bytes")


def _inside(folder: Path, name: Any, path: Path, key: str) -> Path:
    """A file named by bundle.json, refused unless it is a plain relative path inside the bundle folder."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise BundleError(f"{key} {name!r} must be a relative path inside the bundle", path, key)
    return folder / name


def _check_file(folder: Path, name: Any, sha256: Any, path: Path, key: str) -> Path:
    target = _inside(folder, name, path, key)
    if not os.path.lexists(target):
        raise BundleError(f"{key} {name!r} is missing", path, key)
    check_file(target, BundleError, f"{key} {name!r}")
    if file_sha256(target) != sha256:
        raise BundleError(f"{key} {name!r} does not match its sha256 in bundle.json (altered or replaced)", path, key)
    return target


def _load_pack(folder: Path, entry: Any, index: int, heads: np.ndarray, info: dict[str, Any], path: Path) -> BundlePack:
    key = f"packs[{index}]"
    fields = PACK_FIELDS if info["format_version"] == 1 else PACK_FIELDS_2
    if not isinstance(entry, dict) or any(field not in entry for field in fields):
        raise BundleError(f"{key} must be an object with {fields}", path, key)
    pack_path = _check_file(folder, entry["file"], entry["sha256"], path, f"{key}.file")
    try:
        pack = Pack.load(pack_path)
    except PackError as exc:
        raise BundleError(f"{key}: {exc}", path, key) from None
    check_model(pack.model, info["model"], f"pack {entry['name']!r}", "the bundle")
    graph_position = info["prompt"].get(PROMPT_TOKEN_POSITION, DEFAULT_TOKEN_POSITION)
    if pack.token_position != graph_position:
        # The graph returns one token's head outputs; a pack read at another token would get other vectors.
        raise BundleError(f"{key}: pack {entry['name']!r} reads heads at the {pack.token_position!r} token; the bundle's "
                          f"graph gives the {graph_position!r} token's", path, key)
    positions = np.asarray(entry["positions"])
    if positions.shape != (pack.k,) or not np.issubdtype(positions.dtype, np.integer) or (positions < 0).any() or (positions >= len(heads)).any():
        raise BundleError(f"{key}.positions must be {pack.k} indices into graph.heads ({len(heads)} heads)", path, f"{key}.positions")
    if not np.array_equal(heads[positions], pack.heads):
        raise ModelMismatchError(f"{path}: {key}.positions pick heads {heads[positions].tolist()} from the graph, "
                                 f"but pack {entry['name']!r} votes with {pack.heads.tolist()}")
    outputs = None
    if info["format_version"] >= 2:
        if entry["labels"] != list(pack.labels):
            raise BundleError(f"{key}.labels {entry['labels']!r} differ from the pack's {list(pack.labels)}", path, f"{key}.labels")
        outputs = entry["outputs"]
        roles = [role for role in SCORE_ROLES if role in REQUIRED_SCORE_ROLES or (isinstance(outputs, dict) and role in outputs)]
        if not (isinstance(outputs, dict) and all(isinstance(outputs.get(role), str) and outputs[role] for role in roles)):
            raise BundleError(f"{key}.outputs must name the graph output of each of {list(REQUIRED_SCORE_ROLES)} (and of "
                              "'probabilities' when present)", path, f"{key}.outputs")
        outputs = {role: outputs[role] for role in roles}  # roles of a newer writer are ignored
        calibrated = pack.scoring_model is not None
        if PACK_CALIBRATED in entry and entry[PACK_CALIBRATED] is not calibrated:
            raise BundleError(f"{key}.{PACK_CALIBRATED} is {entry[PACK_CALIBRATED]!r}, but pack {entry['name']!r} "
                              f"{'carries' if calibrated else 'carries no'} scoring model", path, f"{key}.{PACK_CALIBRATED}")
    return BundlePack(pack, str(entry["name"]), positions.astype(np.int64), outputs)


def check_model(found: dict[str, Any], expected: dict[str, Any], what: str, against: str) -> None:
    """Refuse a pack (or graph) made for another model: id, revision, family, grid and weights fingerprint must agree."""
    differing = [field for field in MODEL_MATCH_FIELDS if found.get(field) != expected.get(field)]
    if differing:
        details = ", ".join(f"{field} {found.get(field)!r} != {expected.get(field)!r}" for field in differing)
        raise ModelMismatchError(f"{what} was made for another model than {against}: {details}")


def graph_metadata(bundle_model: dict[str, Any], heads: np.ndarray, pack_hashes: list[str],
                   version: int = FORMAT_VERSION) -> dict[str, str]:
    """The metadata_props the writer puts in a graph and the reader checks (check_graph_metadata)."""
    return {
        GRAPH_META_FORMAT: f"{FORMAT_NAME}/{version}",
        GRAPH_META_MODEL: json.dumps({field: bundle_model[field] for field in MODEL_MATCH_FIELDS}, sort_keys=True),
        GRAPH_META_HEADS: json.dumps(np.asarray(heads).tolist()),
        GRAPH_META_PACKS: json.dumps(sorted(pack_hashes)),
    }


def check_graph_metadata(bundle: Bundle, metadata: dict[str, str]) -> None:
    """The graph must have been exported for this model, these heads and these packs."""
    where = bundle.graph_path
    missing = [key for key in GRAPH_META_KEYS if key not in metadata]
    if missing:
        raise ModelMismatchError(f"{where}: graph metadata lacks {missing}: not exported by savpack for this bundle")
    try:
        model = json.loads(metadata[GRAPH_META_MODEL])
        heads = json.loads(metadata[GRAPH_META_HEADS])
        hashes = json.loads(metadata[GRAPH_META_PACKS])
    except ValueError as exc:
        raise ModelMismatchError(f"{where}: graph metadata is not valid JSON: {exc}") from None
    check_model(model, bundle.model, f"graph {where}", "the bundle's packs")
    if heads != bundle.heads.tolist():
        raise ModelMismatchError(f"{where}: the graph returns heads {heads}, bundle.json expects {bundle.heads.tolist()}")
    for entry in bundle.packs:
        if entry.pack.content_hash() not in hashes:
            raise ModelMismatchError(f"{where}: pack {entry.name!r} is not one the graph was exported for (content hash differs)")
