"""The SAV pack format: every name and number a pack writer or reader needs, in one place.

A pack is one safetensors file. Tensors hold the numbers; metadata (string values only, as safetensors requires)
holds the rest, structured values as JSON strings, every key namespaced `savpack.`. The full specification is
docs/format.md; this module is its executable half, imported by the writer (builder) and the reader (runtime).
"""

from __future__ import annotations

FORMAT_NAME = "savpack"
# 2: the pack carries its scoring model (`savpack.scoring`: calibrated probabilities, and for a probe its weights).
# Packs of format 1 still load; they carry no calibration and their probabilities are the vote shares.
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)

# Packs are small (k x classes x head_dim floats); a file far larger than this is not a pack, and reading it whole
# would let a hostile file exhaust memory.
MAX_PACK_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024

# Tensors.
HEADS = "heads"  # int32 (k, 2): (layer, head) of each selected head, in vote order
CENTROIDS = "centroids"  # float32 (k, C, head_dim): class means of each selected head
HEAD_SCORES = "head_scores"  # float32 (k,): selection score of each selected head (labelled-set accuracy)
CLASS_COUNTS = "class_counts"  # int32 (C,): labelled examples per class
ALL_HEAD_SCORES = "all_head_scores"  # float32 (layers, heads): the score of every head, for the head map
REQUIRED_TENSORS = (HEADS, CENTROIDS, HEAD_SCORES, CLASS_COUNTS, ALL_HEAD_SCORES)
# Format 2, only in packs whose scoring classifier is "probe": a linear discriminant over the selected heads' unit
# vectors, concatenated in vote order (docs/format.md section 5).
PROBE_WEIGHT = "probe_weight"  # float32 (C, k * head_dim)
PROBE_BIAS = "probe_bias"  # float32 (C,)
PROBE_TENSORS = (PROBE_WEIGHT, PROBE_BIAS)
# Each tensor's safetensors dtype (DTYPES) and rank.
TENSOR_TYPES = {HEADS: ("I32", 2), CENTROIDS: ("F32", 3), HEAD_SCORES: ("F32", 1), CLASS_COUNTS: ("I32", 1),
                ALL_HEAD_SCORES: ("F32", 2), PROBE_WEIGHT: ("F32", 2), PROBE_BIAS: ("F32", 1)}

# Metadata keys.
META_PREFIX = "savpack."
META_FORMAT = "savpack.format"  # FORMAT_NAME
META_FORMAT_VERSION = "savpack.format_version"  # decimal integer
META_LABELS = "savpack.labels"  # JSON list of C unique strings, index = class id
META_MODEL = "savpack.model"  # JSON object, MODEL_FIELDS
META_PROMPT = "savpack.prompt"  # JSON object, PROMPT_FIELDS
META_SELECTION = "savpack.selection"  # JSON object: k, scoring, shots, seed, ...
META_METRICS = "savpack.metrics"  # JSON object: name -> number
META_NAME = "savpack.name"  # string
META_VERSION = "savpack.version"  # semantic version string
META_CREATED_BY = "savpack.created_by"  # JSON object: package -> version (and commit of a dev build)
META_DATASET = "savpack.dataset"  # JSON object: sha256, examples, per-class counts
META_SCORING = "savpack.scoring"  # JSON object, SCORING_FIELDS; required from format 2, absent in format 1
REQUIRED_META = (META_FORMAT, META_FORMAT_VERSION, META_LABELS, META_MODEL, META_PROMPT, META_SELECTION)
OPTIONAL_META = (META_METRICS, META_NAME, META_VERSION, META_CREATED_BY, META_DATASET)
JSON_META = (META_LABELS, META_MODEL, META_PROMPT, META_SELECTION, META_METRICS, META_CREATED_BY, META_DATASET,
             META_SCORING)

# The scoring model (docs/format.md section 5). classifier: which rule gives the label, "vote" (the heads' vote, the
# SAVs method) or "probe" (the linear head). temperature and sharpness: the calibration of the probabilities, fitted on
# data the pack is not judged on (fitted_on: "cross-validation" over the labelled examples, or "calibration-data").
SCORING_FIELDS = ("classifier", "temperature", "sharpness", "fitted_on")
CLASSIFIERS = ("vote", "probe")
FITTED_ON = ("cross-validation", "calibration-data")

MODEL_FIELDS = ("id", "revision", "family", "grid", "fingerprint")  # grid = [layers, heads, head_dim]
# template: the user text around {text}; rendered: the full prompt after the chat template, with {text} left in;
# image_count: images the rendered prompt holds; chat_template_sha256: which template rendered it (or null).
PROMPT_FIELDS = ("template", "rendered", "image_count", "chat_template_sha256")
TEXT_PLACEHOLDER = "{text}"
# Optional prompt field: the token whose head outputs the pack uses. "last" is the last real token (the SAVs rule, for
# decoders); "first" is the first token, an encoder's [CLS]. A pack without the field uses "last".
PROMPT_TOKEN_POSITION = "token_position"
TOKEN_POSITIONS = ("last", "first")
DEFAULT_TOKEN_POSITION = "last"
# Optional prompt field: frames sampled from each video item (shown to the model as images). Present only in packs
# built from videos; classifying samples the same number, DEFAULT_VIDEO_FRAMES when the pack does not say.
PROMPT_VIDEO_FRAMES = "video_frames"
DEFAULT_VIDEO_FRAMES = 8
MAX_VIDEO_FRAMES = 256  # each frame is a full image for the model: more would only exhaust memory

# safetensors dtype names this project reads and writes.
DTYPES = {"F32": "<f4", "F16": "<f2", "I32": "<i4", "I64": "<i8", "U8": "|u1"}

# Identity (docs/format.md, "Identity"). A name is one or two path-safe segments ("safety" or "team/safety") because
# registries store packs under it; a version is a semantic version (semver.org 2.0.0) without build metadata, because
# build metadata does not change precedence and name@version must name exactly one file.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?"
NAME_MAX_CHARS = 96
_SEMVER_IDENT = r"(0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
VERSION_PATTERN = rf"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-{_SEMVER_IDENT}(\.{_SEMVER_IDENT})*)?"
VERSION_MAX_CHARS = 64
