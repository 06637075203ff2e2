"""Hostile and careless inputs through the command lines and the runtime API, one table row each.

Every row names the input, the command, the exit code and a fragment of the one-line message it must get, and a
time and memory bound. Each row runs in a forked child of the test process (imports shared, so a row costs
milliseconds unless it loads a model): a row that hangs is killed at its time bound and fails, and the child's peak
resident memory above what it inherited is measured (the kernel's high-water mark, reset when the row starts) and
must stay under the row's bound. The child's address space is also capped, so a regression that allocates without
bound fails the row instead of the machine. A row fails too on a traceback, and when an input it names as kept
changed (nothing an input is ever written or deleted). docs/errors.md lists every row's message.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import resource
import select
import shutil
import signal
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not Path("/proc/self/clear_refs").exists(),
                                reason="the hostile table forks and reads Linux's /proc")

EXPORTED = Path(__file__).resolve().parents[1] / "exported" / "bundles"
HEADROOM = 4 << 30  # address space a row may add to what it inherits before allocations fail


@dataclass(frozen=True)
class Row:
    id: str
    command: str  # "savpack ...", "savpack-run ..." or "api NAME" (API_CALLS); {name} fills in from the workspace
    code: int  # exit code (api rows: 0 when it returns, 1 when it raises a SavpackError)
    fragment: str  # must appear in the output (api rows: in the error message)
    seconds: float = 10.0
    megabytes: int = 150  # peak resident memory above what the child inherited
    keep: tuple[str, ...] = ()  # workspace names whose bytes must be unchanged afterwards
    block: tuple[str, ...] = ()  # modules made unimportable for the row (a missing optional extra)


TABLE = [
    # -- pack files read by inspect, verify, card, build --activations --------------------------------------------
    Row("pack-dev-zero", "savpack inspect /dev/zero", 1, "/dev/zero: file is a character device, not a regular file"),
    Row("pack-dev-urandom", "savpack verify /dev/urandom", 1, "/dev/urandom: file is a character device"),
    Row("pack-fifo", "savpack inspect {fifo}", 1, "file is a FIFO (named pipe), not a regular file"),
    Row("pack-fifo-verify", "savpack verify {fifo}", 1, "FIFO (named pipe)"),
    Row("pack-fifo-card", "savpack card {fifo} --out -", 1, "FIFO (named pipe)"),
    Row("pack-link-loop", "savpack inspect {loop}", 1, "file is a symbolic link loop"),
    Row("pack-broken-link", "savpack inspect {broken_link}", 1, "file is a symbolic link to nothing (broken link)"),
    Row("pack-folder", "savpack inspect {folder}", 1, "file is a folder, expected a file"),
    Row("pack-missing", "savpack inspect {tmp}/absent.safetensors", 1, "absent.safetensors: file does not exist"),
    Row("pack-huge-sparse", "savpack inspect {huge}", 1, "more than the limit of 268435456"),
    Row("pack-empty", "savpack inspect {empty}", 1, "file is 0 bytes, shorter than the 8-byte header length field"),
    Row("pack-header-length-absurd", "savpack inspect {absurd_header}", 1, "header claims 18446744073709551615 bytes"),
    Row("pack-truncated", "savpack inspect {truncated_pack}", 1, "(truncated file?)"),
    Row("pack-surrogate-header", "savpack inspect {surrogate_outer}", 1, "header entry 'savpack.name' holds invalid Unicode"),
    Row("pack-surrogate-metadata", "savpack inspect {surrogate_inner}", 1, "savpack.labels holds invalid Unicode"),
    Row("pack-surrogate-json", "savpack inspect --json {surrogate_inner}", 1, "savpack.labels holds invalid Unicode"),
    Row("pack-surrogate-verify", "savpack verify {surrogate_outer}", 1, "holds invalid Unicode (a lone surrogate"),
    Row("pack-surrogate-verify-json", "savpack verify --json {surrogate_inner}", 1, "holds invalid Unicode"),
    Row("pack-activations-fifo", "savpack build --activations {fifo} --out {tmp}/out.safetensors", 1, "FIFO (named pipe)"),
    Row("pack-activations-dev", "savpack build --activations /dev/zero --out {tmp}/out.safetensors", 1, "character device"),
    Row("inspect-shows-file-sha256", "savpack inspect {foreign_layout}", 0, "sha256      {foreign_layout_sha256}"),
    # -- data files ------------------------------------------------------------------------------------------------
    Row("data-dev-zero", "savpack build --model {model} --data /dev/zero --out {tmp}/out.safetensors", 1,
        "/dev/zero: dataset is a character device, not a regular file"),
    Row("data-fifo", "savpack build --model {model} --data {fifo} --out {tmp}/out.safetensors", 1, "dataset is a FIFO"),
    Row("data-link-loop", "savpack build --model {model} --data {loop} --out {tmp}/out.safetensors", 1,
        "dataset is a symbolic link loop"),
    Row("data-line-without-end", "savpack build --model {model} --data {nul_jsonl} --out {tmp}/out.safetensors", 1,
        "nul.jsonl:1: line is longer than 16777216 characters"),
    Row("data-json-huge", "savpack build --model {model} --data {huge_json} --out {tmp}/out.safetensors", 1,
        "JSON dataset is 314572800 bytes, more than the limit of 268435456"),
    Row("data-null-label", "savpack build --model {model} --data {d_null_label} --out {tmp}/out.safetensors", 1,
        "null-label.jsonl:2: field 'label' is null; every example needs its class as a string"),
    Row("data-duplicate-key", "savpack build --model {model} --data {d_duplicate_key} --out {tmp}/out.safetensors", 1,
        "duplicate-key.jsonl:1: line gives the key 'label' twice; which value is meant is unclear"),
    Row("data-label-newline", "savpack build --model {model} --data {d_label_newline} --out {tmp}/out.safetensors", 1,
        "field 'label' 'warm\\nweather' holds U+000A (a control character); a label is one line of printable text"),
    Row("data-label-control", "savpack build --model {model} --data {d_label_control} --out {tmp}/out.safetensors", 1,
        "holds U+001B (a control character)"),
    Row("data-folder-label-tab", "savpack build --model {model} --data {d_folder_tab} --out {tmp}/out.safetensors", 1,
        "folder name (the label) 'cold\\tweather' holds U+0009"),
    Row("data-text-surrogate", "savpack build --model {model} --data {d_text_surrogate} --out {tmp}/out.safetensors", 1,
        "field 'text' holds invalid Unicode"),
    Row("data-image-url", "savpack build --model {model_vl} --data {d_image_url} --out {tmp}/out.safetensors", 1,
        "field 'image': 'https://example.com/cat.png' is a URL; savpack reads local image files only"),
    Row("data-image-and-images", "savpack build --model {model_vl} --data {d_image_and_images} --out {tmp}/out.safetensors", 1,
        "gives both 'images' and 'image'; use one"),
    Row("data-image-fifo", "savpack build --model {model_vl} --data {d_image_fifo} --out {tmp}/out.safetensors", 1,
        "field 'image': {fifo}: image file is a FIFO"),
    Row("data-bom-jsonl", "savpack build --model {model} --data {d_bom_jsonl} --out {tmp}/bom-jsonl.safetensors --k 4", 0,
        "labels      cold, shape, warm", seconds=30),
    Row("data-bom-csv", "savpack build --model {model} --data {d_bom_csv} --out {tmp}/bom-csv.safetensors --k 4", 0,
        "labels      cold, shape, warm", seconds=30),
    Row("run-data-fifo", "savpack-run classify {bundle} --data {fifo}", 1, "dataset is a FIFO (named pipe)"),
    Row("run-data-dev-zero", "savpack-run classify {bundle} --data /dev/zero", 1, "dataset is a character device"),
    Row("run-data-bom", "savpack-run classify {bundle} --data {d_bom_jsonl} --json", 0, '"label"'),
    Row("run-data-duplicate-key", "savpack-run classify {bundle} --data {d_duplicate_key}", 1, "gives the key 'label' twice"),
    # -- folder registries ----------------------------------------------------------------------------------------
    Row("registry-bad-entry", "savpack list {registry_bad_entry_uri}", 1,
        "index.json: entry team/words@1.0.0: must be an object with 'file' (a path) and 'sha256' (64 hex digits)"),
    Row("registry-entry-outside", "savpack pull {registry_outside_uri}/team/words@1.0.0 --out {tmp}", 1,
        "index.json: entry team/words@1.0.0: file '../../kept.txt' points outside the registry"),
    Row("registry-index-fifo", "savpack list {registry_fifo_uri}", 1, "index.json: registry index is a FIFO"),
    # -- model folders --------------------------------------------------------------------------------------------
    Row("model-dev-zero", "savpack build --model /dev/zero --data {train} --out {tmp}/out.safetensors", 1,
        "/dev/zero: model folder is a character device, expected a folder"),
    Row("model-fifo", "savpack build --model {fifo} --data {train} --out {tmp}/out.safetensors", 1,
        "model folder is a FIFO (named pipe), expected a folder"),
    Row("model-link-loop", "savpack build --model {loop} --data {train} --out {tmp}/out.safetensors", 1,
        "model folder is a symbolic link loop"),
    Row("model-missing", "savpack build --model ./no-such-folder --data {train} --out {tmp}/out.safetensors", 1,
        "no-such-folder: model folder does not exist"),
    Row("model-truncated-weights", "savpack build --model {m_truncated} --data {train} --out {tmp}/out.safetensors", 1,
        "model.safetensors: weights file is truncated"),
    Row("model-weights-100-bytes", "savpack build --model {m_stub} --data {train} --out {tmp}/out.safetensors", 1,
        "(truncated or not a safetensors file)"),
    Row("model-zero-heads", "savpack build --model {m_zero_heads} --data {train} --out {tmp}/out.safetensors", 1,
        "config num_attention_heads is 0; expected a whole number from 1 to 1024"),
    Row("model-absurd-hidden", "savpack build --model {m_hidden} --data {train} --out {tmp}/out.safetensors", 1,
        "config hidden_size is 10000000"),
    Row("model-absurd-layers", "savpack build --model {m_layers} --data {train} --out {tmp}/out.safetensors", 1,
        "config num_hidden_layers is 100000"),
    Row("model-absurd-vocabulary", "savpack build --model {m_vocab} --data {train} --out {tmp}/out.safetensors", 1,
        "config.json declares a model of", seconds=20),
    Row("model-weights-lack-layers", "savpack build --model {m_missing} --data {train} --out {tmp}/out.safetensors", 1,
        "the weights lack 24 tensor(s) the config declares", seconds=20),
    Row("model-config-fifo", "savpack build --model {m_config_fifo} --data {train} --out {tmp}/out.safetensors", 1,
        "config.json: model file is a FIFO"),
    Row("model-config-huge", "savpack build --model {m_config_huge} --data {train} --out {tmp}/out.safetensors", 1,
        "config.json: model file is 1073741824 bytes, more than the limit"),
    Row("model-config-not-json", "savpack build --model {m_config_garbage} --data {train} --out {tmp}/out.safetensors", 1,
        "cannot load model"),
    Row("model-weights-device", "savpack build --model {m_weights_dev} --data {train} --out {tmp}/out.safetensors", 1,
        "model.safetensors: model file is a character device"),
    Row("model-no-weights", "savpack build --model {m_no_weights} --data {train} --out {tmp}/out.safetensors", 1,
        "cannot load model", seconds=20),
    # -- outputs: --force never replaces what is not savpack's own output, never an input ---------------------------
    Row("export-over-model-folder", "savpack export --pack {pack} --model {model_copy} --out {model_copy} --force", 1,
        "the output is the input", keep=("model_copy",)),
    Row("export-over-parent-of-model", "savpack export --pack {pack} --model {model_copy} --out {tmp} --force", 1,
        "the output holds the input", keep=("model_copy",)),
    Row("export-over-foreign-folder", "savpack export --pack {pack} --model {model_copy} --out {foreign_folder} --force", 1,
        "holds no bundle.json, so savpack did not write it", keep=("foreign_folder",)),
    Row("export-over-pack", "savpack export --pack {pack} --model {model_copy} --out {pack} --force", 2,
        "is a file", keep=("pack",)),
    Row("export-into-model-folder", "savpack export --pack {pack} --model {model_copy} --out {model_copy}/bundle", 1,
        "lies inside the input", keep=("model_copy",)),
    # the model named is broken: the output is checked first, before any model loads
    Row("export-unwritable", "savpack export --pack {pack} --model {m_zero_heads} --out /sys/savpack-bundle", 1,
        "folder /sys is not writable"),
    Row("build-over-activations", "savpack build --activations {acts} --out {acts} --force", 1, "the output is the input",
        keep=("acts",)),
    Row("build-over-data", "savpack build --model {model} --data {train} --out {train} --force", 1,
        "the output is the input", keep=("train",)),
    Row("build-into-model-folder", "savpack build --model {model_copy} --data {train} --out {model_copy}/p.safetensors", 1,
        "lies inside the input", keep=("model_copy",)),
    Row("build-over-dev-null", "savpack build --activations {acts} --out /dev/null --force", 1,
        "/dev/null: is a character device; savpack replaces only regular files"),
    Row("build-over-fifo", "savpack build --activations {acts} --out {fifo} --force", 1, "is a FIFO (named pipe); savpack"),
    Row("build-over-link", "savpack build --activations {acts} --out {link_to_kept} --force", 1,
        "is a symbolic link; savpack does not replace links", keep=("kept",)),
    Row("build-unwritable", "savpack build --model {m_zero_heads} --data {train} --out /sys/p.safetensors", 1,
        "folder /sys is not writable"),
    Row("extract-unwritable", "savpack extract --model {m_zero_heads} --data {train} --out /sys/a.safetensors", 1,
        "folder /sys is not writable"),
    Row("card-over-pack", "savpack card {pack} --out {pack} --force", 1, "the output is the input", keep=("pack",)),
    Row("plot-over-pack", "savpack inspect {pack} --plot {pack} --force", 1, "the output is the input", keep=("pack",)),
    Row("convert-over-foreign-folder", "savpack convert-gguf {gguf_stub} --out {foreign_folder} --force", 1,
        "holds no savpack_conversion.json", keep=("foreign_folder",)),
    Row("convert-fifo", "savpack convert-gguf {fifo_gguf} --out {tmp}/converted", 1, "GGUF file is a FIFO"),
    # -- numeric options -----------------------------------------------------------------------------------------
    Row("tolerance-nan", "savpack export --pack {pack} --model {model} --out {tmp}/b --tolerance nan", 2,
        "tolerance must be a finite number above 0, got nan"),
    Row("tolerance-inf", "savpack export --pack {pack} --model {model} --out {tmp}/b --tolerance inf", 2,
        "finite number above 0, got inf"),
    Row("tolerance-negative", "savpack export --pack {pack} --model {model} --out {tmp}/b --tolerance -1", 2,
        "finite number above 0, got -1.0"),
    Row("tolerance-zero", "savpack export --pack {pack} --model {model} --out {tmp}/b --tolerance 0", 2,
        "finite number above 0, got 0.0"),
    Row("shots-zero", "savpack build --model {model} --data {train} --out {tmp}/out.safetensors --shots 0", 2,
        "0 is not in the range x>=1"),
    Row("shots-negative", "savpack build --activations {acts} --out {tmp}/out.safetensors --shots -3", 2, "x>=1"),
    Row("k-zero", "savpack build --activations {acts} --out {tmp}/out.safetensors --k 0", 2, "must be >= 1, got 0"),
    Row("k-negative", "savpack build --activations {acts} --out {tmp}/out.safetensors --k -5", 2, "must be >= 1, got -5"),
    Row("k-nan", "savpack build --activations {acts} --out {tmp}/out.safetensors --k nan", 2, "'nan' is neither a number"),
    Row("k-float", "savpack build --activations {acts} --out {tmp}/out.safetensors --k 1e9", 2, "'1e9' is neither a number"),
    Row("k-above-heads", "savpack build --activations {acts} --out {tmp}/out.safetensors --k 99", 1,
        "k = 99 heads requested, but the model has 4 x 8 = 32"),
    Row("batch-size-zero", "savpack build --model {model} --data {train} --out {tmp}/out.safetensors --batch-size 0", 2,
        "0 is not in the range x>=1"),
    Row("video-frames-absurd", "savpack build --model {model} --data {train} --out {tmp}/out.safetensors --video-frames 100000", 2,
        "100000 is not in the range 1<=x<=256"),
    Row("run-threads-negative", "savpack-run classify {bundle} --data {items} --threads -1", 2, "-1 is not between 1 and 1024"),
    Row("run-threads-zero", "savpack-run classify {bundle} --data {items} --threads 0", 2, "0 is not between 1 and 1024"),
    Row("run-threads-absurd", "savpack-run classify {bundle} --data {items} --threads 100000", 2, "100000 is not between"),
    Row("run-batch-size-zero", "savpack-run classify {bundle} --data {items} --batch-size 0", 2, "0 is not between 1 and 4096"),
    Row("run-batch-size-nan", "savpack-run classify {bundle} --data {items} --batch-size nan", 2, "'nan' is not a whole number"),
    Row("run-abstain-nan", "savpack-run classify {bundle} --data {items} --abstain-below nan", 2, "'nan' is not a probability from 0 to 1"),
    Row("run-abstain-above-one", "savpack-run classify {bundle} --data {items} --abstain-below 1.5", 2, "'1.5' is not a probability"),
    Row("abstain-negative", "savpack classify --pack {pack} --model {model} --data {train} --abstain-below -0.1", 2,
        "--abstain-below must be a probability from 0 to 1, got -0.1"),
    Row("abstain-inf", "savpack classify --pack {pack} --model {model} --data {train} --abstain-below inf", 2,
        "--abstain-below must be a probability from 0 to 1, got inf"),
    Row("build-classifier-unknown", "savpack build --activations {acts} --out {tmp}/out.safetensors --classifier forest", 2,
        "'forest' is not one of 'vote', 'probe', 'auto'"),
    Row("build-calibration-without-model", "savpack build --activations {acts} --out {tmp}/out.safetensors --calibration {train}", 2,
        "--calibration runs the model on the calibration data: give --model"),
    Row("build-calibration-unknown-label", "savpack build --model {model} --data {train} --out {tmp}/out.safetensors "
        "--calibration {d_stray_label}", 1, "stray-label.jsonl:1: calibration label 'hot' is not one of the training labels",
        seconds=30, megabytes=400),
    Row("classify-probability-vote-format-1", "api probability_vote_format_1", 1, "vote method 'probability' needs a calibrated pack"),
    # -- bundles -------------------------------------------------------------------------------------------------
    Row("bundle-altered-weights", "savpack-run classify {bundle_altered} --data {items}", 1,
        "graph weights file 'graph.onnx.data' does not match its sha256 in bundle.json"),
    Row("bundle-altered-weights-info", "savpack-run info {bundle_altered}", 1, "does not match its sha256"),
    Row("bundle-altered-weights-opt-out", "savpack-run classify {bundle_altered} --data {items} --no-check-weights", 0,
        "items.jsonl:1"),
    Row("bundle-fifo", "savpack-run info {fifo}", 1, "bundle folder is a FIFO (named pipe), expected a folder"),
    Row("bundle-dev-zero", "savpack-run classify /dev/zero --data {items}", 1, "bundle folder is a character device"),
    Row("bundle-link-loop", "savpack-run info {loop}", 1, "bundle folder is a symbolic link loop"),
    Row("bundle-weights-fifo", "savpack-run info {bundle_weights_fifo}", 1, "graph weights file 'graph.onnx.data' is a FIFO"),
    Row("bundle-tokenizer-device", "savpack-run info {bundle_tokenizer_dev}", 1, "'tokenizer.json' is a character device"),
    Row("bundle-json-huge", "savpack-run info {bundle_json_huge}", 1, "bundle.json: file is 10485760 bytes, more than the limit"),
    Row("bundle-json-fifo", "savpack-run info {bundle_json_fifo}", 1, "bundle.json: file is a FIFO"),
    Row("bundle-pack-fifo", "savpack-run info {bundle_pack_fifo}", 1, "is a FIFO (named pipe), not a regular file"),
    Row("bundle-image-aspect-ratio", "savpack-run classify {bundle_vl} --data {items_thin}", 1,
        "(1x300): aspect ratio 300 is above the 200 that Qwen2-VL accepts"),
    # -- the runtime API -----------------------------------------------------------------------------------------
    Row("api-classifier-altered-weights", "api classifier_altered", 1, "does not match its sha256"),
    Row("api-classifier-threads", "api classifier_threads", 1, "threads must be a whole number from 1 to 1024"),
    Row("api-classifier-batch-size", "api classifier_batch_size", 1, "batch_size must be a whole number from 1 to 4096"),
    Row("api-pack-fifo", "api pack_fifo", 1, "FIFO (named pipe)"),
    Row("api-pack-dev-zero", "api pack_dev_zero", 1, "character device"),
    Row("api-pack-surrogate", "api pack_surrogate", 1, "holds invalid Unicode"),
    # -- images and families the builder meets -------------------------------------------------------------------
    Row("build-image-aspect-ratio", "savpack build --model {model_vl} --data {colour_thin} --out {tmp}/out.safetensors", 1,
        "the qwen2_vl processor refuses this item (image size 1x300): absolute aspect ratio must be smaller than 200",
        seconds=30),
    Row("build-image-bomb", "savpack build --model {model_vl} --data {colour_bomb} --out {tmp}/out.safetensors", 1,
        "declares 9000x9000 pixels, more than the limit", seconds=30),
    Row("export-int8-without-its-check-data", "savpack export --pack {pack_gpt2} --model {model_gpt2} --out {tmp}/b-gpt2 "
        "--quantize int8", 2, "--quantize int8 needs --data (the examples the packs were built from) and/or --check-data", seconds=30),
    Row("export-check-data-without-quantize", "savpack export --pack {pack_gpt2} --model {model_gpt2} --out {tmp}/b-gpt2 "
        "--check-data {items}", 2, "--data, --check-data, --min-agreement and --keep-float go with --quantize int8", seconds=30),
    Row("export-keep-float-auto-without-data", "savpack export --pack {pack_gpt2} --model {model_gpt2} --out {tmp}/b-gpt2 "
        "--quantize int8 --check-data {items} --keep-float auto", 2, "--keep-float auto chooses on the packs' own examples", seconds=30),
    Row("export-check-data-empty", "savpack export --pack {pack_gpt2} --model {model_gpt2} --out {tmp}/b-gpt2 "
        "--quantize int8 --check-data {check_empty}", 1, "check-empty.jsonl: dataset holds no examples", seconds=30,
        keep=("check_empty",)),
    Row("export-check-data-bad-json", "savpack export --pack {pack_gpt2} --model {model_gpt2} --out {tmp}/b-gpt2 "
        "--quantize int8 --check-data {check_bad_json}", 1, "check-bad.jsonl:2: line is not valid JSON", seconds=30,
        keep=("check_bad_json",)),
    Row("export-check-data-no-text", "savpack export --pack {pack_gpt2} --model {model_gpt2} --out {tmp}/b-gpt2 "
        "--quantize int8 --check-data {check_no_text}", 1, "check-no-text.jsonl:1: item has no text", seconds=30),
    Row("export-check-data-image-for-text-prompt", "savpack export --pack {pack_gpt2} --model {model_gpt2} --out "
        "{tmp}/b-gpt2 --quantize int8 --check-data {items_thin}", 1,
        "items-thin.jsonl:1: --check-data item: this bundle's prompt is text-only; the item has 1 image(s)", seconds=60),
    Row("export-without-extra", "savpack export --pack {pack} --model {model} --out {tmp}/b-no-onnx", 1,
        "savpack export needs onnx and onnxscript: pip install 'savpack[export]'", block=("onnx", "onnxscript")),
    # -- what must work ------------------------------------------------------------------------------------------
    Row("default-k-on-a-small-model", "savpack build --model {model_small} --data {train} --out {tmp}/small.safetensors", 0,
        "the model has 8 attention heads, fewer than the default k = 20: every head votes (k = 8)", seconds=30),
    Row("float16-pack-at-float32", "savpack classify --pack {pack16} --model {model} --data {test} --dtype float32", 0,
        '"label"', seconds=30),
    Row("prompt-without-text", "savpack build --model {model} --data {train} --out {tmp}/fixed.safetensors --k 4 --prompt Classify", 0,
        "holds no {{text}}: the items' text is left out", seconds=30),
]


def test_the_table_is_large_and_its_ids_unique():
    assert len(TABLE) >= 60 and len({row.id for row in TABLE}) == len(TABLE)


# -- the workspace: every hostile input, built once ------------------------------------------------------------------

def _sparse(path: Path, size: int) -> Path:
    """A file of `size` bytes that uses no disk: a reader without a bound would still read them all."""
    path.touch()
    os.truncate(path, size)
    return path


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _with_header(source: Path, target: Path, edit) -> Path:
    """A copy of a safetensors file whose header JSON text went through `edit`."""
    data = source.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    text = edit(data[8 : 8 + size].decode())
    encoded = text.encode() + b" " * (-len(text.encode()) % 8)
    target.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size :])
    return target


def _model_copy(source: Path, target: Path, config_edit=None) -> Path:
    shutil.copytree(source, target)
    if config_edit is not None:
        config = json.loads((target / "config.json").read_text())
        config_edit(config)
        (target / "config.json").write_text(json.dumps(config))
    return target


def _image_data(colour_train: Path, target: Path, image: Path) -> Path:
    records = [json.loads(line) for line in colour_train.read_text().splitlines() if line.strip()]
    for record in records:
        record["image"] = str(colour_train.parent / record["image"])
    records[0]["image"] = str(image)
    target.write_text("".join(json.dumps(record) + "\n" for record in records))
    return target


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, model_dir, loaded_model, text_task, colour_task) -> dict[str, str]:
    import safetensors.numpy
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from savpack.data import load_examples
    from savpack.testing import build_fixture
    from savpack.models import load_model
    from savpack.pipeline import extract_activations, pack_from_activations

    tmp = tmp_path_factory.mktemp("hostile")
    model = model_dir("qwen2")
    ws: dict[str, Path | str] = {"tmp": tmp, "model": model, "model_vl": model_dir("qwen2_vl"), "train": text_task[0],
                                 "test": text_task[1]}

    os.mkfifo(tmp / "fifo")
    os.mkfifo(tmp / "fifo.gguf")
    ws["fifo"], ws["fifo_gguf"] = tmp / "fifo", tmp / "fifo.gguf"
    os.symlink(tmp / "loop-b", tmp / "loop-a")
    os.symlink(tmp / "loop-a", tmp / "loop-b")
    ws["loop"] = tmp / "loop-a"
    os.symlink(tmp / "nowhere", tmp / "broken")
    ws["broken_link"] = tmp / "broken"
    (tmp / "a-folder").mkdir()
    ws["folder"] = tmp / "a-folder"
    ws["huge"] = _sparse(tmp / "huge.safetensors", 300 << 20)
    ws["empty"] = tmp / "empty.safetensors"
    ws["empty"].write_bytes(b"")
    ws["absurd_header"] = tmp / "absurd.safetensors"
    ws["absurd_header"].write_bytes(b"\xff" * 16)
    ws["kept"] = tmp / "kept.txt"
    ws["kept"].write_text("do not replace me")
    os.symlink(ws["kept"], tmp / "link-to-kept.safetensors")
    ws["link_to_kept"] = tmp / "link-to-kept.safetensors"
    ws["foreign_folder"] = tmp / "photos"
    ws["foreign_folder"].mkdir()
    (ws["foreign_folder"] / "holiday.jpg").write_bytes(b"not really a photo")
    ws["gguf_stub"] = tmp / "model.gguf"
    ws["gguf_stub"].write_bytes(b"GGUF")

    # packs and activations of the qwen2 fixture
    activations = extract_activations(loaded_model("qwen2"), load_examples(text_task[0]), progress=False)
    ws["acts"] = activations.save(tmp / "acts.safetensors")
    pack = pack_from_activations(activations, k=4)
    ws["pack"] = pack.save(tmp / "pack.safetensors")
    half = load_model(str(model), device="cpu", dtype="float16")
    ws["pack16"] = pack_from_activations(extract_activations(half, load_examples(text_task[0]), progress=False), k=4).save(tmp / "pack16.safetensors")
    del half
    data = ws["pack"].read_bytes()
    ws["truncated_pack"] = tmp / "truncated.safetensors"
    ws["truncated_pack"].write_bytes(data[: len(data) - 10])
    ws["surrogate_outer"] = _with_header(ws["pack"], tmp / "outer.safetensors",
                                         lambda text: text.replace('"__metadata__":{', '"__metadata__":{"savpack.name":"\\udc80",'))
    ws["surrogate_inner"] = _with_header(ws["pack"], tmp / "inner.safetensors",
                                         lambda text: text.replace('"savpack.labels":"[\\"cold\\"', '"savpack.labels":"[\\"\\\\udc80\\"'))
    tensors, metadata = pack.to_tensors_and_metadata()
    ws["foreign_layout"] = tmp / "foreign-layout.safetensors"  # written by the safetensors library: other bytes
    safetensors.numpy.save_file(tensors, str(ws["foreign_layout"]), metadata=metadata)
    ws["foreign_layout_sha256"] = hashlib.sha256(ws["foreign_layout"].read_bytes()).hexdigest()
    assert ws["foreign_layout_sha256"] != pack.content_hash()

    # model folders
    ws["model_copy"] = _model_copy(model, tmp / "model-copy")
    ws["m_truncated"] = _model_copy(model, tmp / "m-truncated")
    weights = (model / "model.safetensors").read_bytes()
    (ws["m_truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    ws["m_stub"] = _model_copy(model, tmp / "m-stub")
    (ws["m_stub"] / "model.safetensors").write_bytes(weights[:100])
    ws["m_zero_heads"] = _model_copy(model, tmp / "m-zero-heads", lambda c: c.update(num_attention_heads=0))
    ws["m_hidden"] = _model_copy(model, tmp / "m-hidden", lambda c: c.update(hidden_size=10_000_000))
    ws["m_layers"] = _model_copy(model, tmp / "m-layers",
                                 lambda c: c.update(num_hidden_layers=100_000, layer_types=["full_attention"] * 100_000))
    ws["m_vocab"] = _model_copy(model, tmp / "m-vocab", lambda c: c.update(vocab_size=10_000_000))
    ws["m_missing"] = _model_copy(model, tmp / "m-missing",
                                  lambda c: c.update(num_hidden_layers=6, layer_types=["full_attention"] * 6))
    ws["m_config_fifo"] = _model_copy(model, tmp / "m-config-fifo")
    (ws["m_config_fifo"] / "config.json").unlink()
    os.mkfifo(ws["m_config_fifo"] / "config.json")
    ws["m_config_huge"] = _model_copy(model, tmp / "m-config-huge")
    _sparse(ws["m_config_huge"] / "config.json", 1 << 30)
    ws["m_config_garbage"] = _model_copy(model, tmp / "m-config-garbage")
    (ws["m_config_garbage"] / "config.json").write_text("{not json")
    ws["m_weights_dev"] = _model_copy(model, tmp / "m-weights-dev")
    (ws["m_weights_dev"] / "model.safetensors").unlink()
    os.symlink("/dev/zero", ws["m_weights_dev"] / "model.safetensors")
    ws["m_no_weights"] = _model_copy(model, tmp / "m-no-weights")
    (ws["m_no_weights"] / "model.safetensors").unlink()
    ws["model_small"] = _model_copy(model, tmp / "model-small")  # 2 layers x 4 heads: fewer than the default k
    config = AutoConfig.from_pretrained(model)
    config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads = 2, 4, 2
    config.layer_types = config.layer_types[:2]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(ws["model_small"])
    ws["model_gpt2"] = build_fixture("gpt2", tmp / "gpt2")
    gpt2 = load_model(str(ws["model_gpt2"]), device="cpu")
    ws["pack_gpt2"] = pack_from_activations(extract_activations(gpt2, load_examples(text_task[0]), progress=False), k=2).save(tmp / "gpt2.safetensors")

    # data files
    def data(name: str, text: str) -> Path:
        (tmp / name).write_text(text, encoding="utf-8")
        return tmp / name

    lines = [json.loads(line) for line in text_task[0].read_text().splitlines() if line.strip()]
    ws["nul_jsonl"] = _sparse(tmp / "nul.jsonl", 300 << 20)  # 300 MB of NUL bytes and no line end
    ws["huge_json"] = _sparse(tmp / "huge.json", 300 << 20)
    ws["d_null_label"] = data("null-label.jsonl", '{"text": "red sun", "label": "warm"}\n{"text": "blue ice", "label": null}\n')
    ws["d_stray_label"] = data("stray-label.jsonl", '{"text": "red sun", "label": "hot"}\n')
    ws["d_duplicate_key"] = data("duplicate-key.jsonl", '{"text": "red sun", "label": "warm", "label": "cold"}\n')
    ws["d_label_newline"] = data("label-newline.jsonl", json.dumps({"text": "red sun", "label": "warm\nweather"}) + "\n")
    ws["d_label_control"] = data("label-control.jsonl", json.dumps({"text": "red sun", "label": "warm\x1b[31m"}) + "\n")
    ws["d_text_surrogate"] = data("text-surrogate.jsonl", '{"text": "red \\udc80 sun", "label": "warm"}\n')
    (tmp / "folder-tab" / "cold\tweather").mkdir(parents=True)
    (tmp / "folder-tab" / "cold\tweather" / "a.txt").write_text("blue ice")
    ws["d_folder_tab"] = tmp / "folder-tab"
    ws["d_image_url"] = data("image-url.jsonl", '{"text": "what colour?", "image": "https://example.com/cat.png", "label": "red"}\n')
    ws["d_image_and_images"] = data("image-and-images.jsonl", json.dumps(
        {"text": "what colour?", "image": str(tmp / "kept.txt"), "images": [str(tmp / "kept.txt")], "label": "red"}) + "\n")
    ws["d_image_fifo"] = data("image-fifo.jsonl", json.dumps({"text": "what colour?", "image": str(ws["fifo"]), "label": "red"}) + "\n")
    ws["d_bom_jsonl"] = tmp / "bom.jsonl"
    ws["d_bom_jsonl"].write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(line) + "\n" for line in lines).encode())
    ws["d_bom_csv"] = tmp / "bom.csv"
    ws["d_bom_csv"].write_bytes(b"\xef\xbb\xbf" + "".join(f"{line['text']},{line['label']}\n" for line in
                                                            [{"text": "text", "label": "label"}] + lines).encode())

    # folder registries
    from savpack.sharing import FolderRegistry, RegistryRef

    def registry(name: str, change) -> str:
        root = tmp / name
        FolderRegistry.create_or_open(RegistryRef(root)).push(ws["named_pack"])
        index = json.loads((root / "index.json").read_text())
        change(index["packs"]["team/words"]["1.0.0"])
        (root / "index.json").write_text(json.dumps(index))
        return root.as_uri()

    ws["named_pack"] = pack.replace(name="team/words", version="1.0.0").save(tmp / "named.safetensors")
    ws["registry_bad_entry_uri"] = registry("registry-bad", lambda entry: entry.pop("sha256"))
    ws["registry_outside_uri"] = registry("registry-outside", lambda entry: entry.update(file="../../kept.txt"))
    ws["registry_fifo_uri"] = registry("registry-fifo", lambda entry: None)
    (tmp / "registry-fifo" / "index.json").unlink()
    os.mkfifo(tmp / "registry-fifo" / "index.json")

    # images
    from PIL import Image

    Image.new("RGB", (1, 300), (200, 30, 30)).save(tmp / "thin.png")
    (tmp / "bomb.png").write_bytes(_png_claiming(9000, 9000))
    ws["colour_thin"] = _image_data(colour_task[0], tmp / "colour-thin.jsonl", tmp / "thin.png")
    ws["colour_bomb"] = _image_data(colour_task[0], tmp / "colour-bomb.jsonl", tmp / "bomb.png")

    # bundles (copies of the golden ones)
    def bundle_copy(name: str, case: str = "qwen2") -> Path:
        return Path(shutil.copytree(EXPORTED / case / "bundle", tmp / name))

    ws["bundle"] = bundle_copy("bundle")
    ws["bundle_vl"] = bundle_copy("bundle-vl", "qwen2_vl")
    ws["items"] = tmp / "items.jsonl"
    ws["items"].write_text('{"text": "the red sun"}\n')
    ws["items_thin"] = tmp / "items-thin.jsonl"
    ws["items_thin"].write_text(json.dumps({"text": "what colour?", "image": str(tmp / "thin.png")}) + "\n")
    ws["check_empty"] = tmp / "check-empty.jsonl"
    ws["check_empty"].write_text("")
    ws["check_bad_json"] = tmp / "check-bad.jsonl"
    ws["check_bad_json"].write_text('{"text": "fine"}\n{"text": broken\n')
    ws["check_no_text"] = tmp / "check-no-text.jsonl"
    ws["check_no_text"].write_text('{"label": "warm"}\n')
    ws["bundle_altered"] = bundle_copy("bundle-altered")
    weights = bytearray((ws["bundle_altered"] / "graph.onnx.data").read_bytes())
    weights[len(weights) // 2] ^= 0x01  # one bit, same size: only the digest notices
    (ws["bundle_altered"] / "graph.onnx.data").write_bytes(bytes(weights))
    ws["bundle_weights_fifo"] = bundle_copy("bundle-weights-fifo")
    (ws["bundle_weights_fifo"] / "graph.onnx.data").unlink()
    os.mkfifo(ws["bundle_weights_fifo"] / "graph.onnx.data")
    ws["bundle_tokenizer_dev"] = bundle_copy("bundle-tokenizer-dev")
    (ws["bundle_tokenizer_dev"] / "tokenizer.json").unlink()
    os.symlink("/dev/zero", ws["bundle_tokenizer_dev"] / "tokenizer.json")
    ws["bundle_json_huge"] = bundle_copy("bundle-json-huge")
    _sparse(ws["bundle_json_huge"] / "bundle.json", 10 << 20)
    ws["bundle_json_fifo"] = bundle_copy("bundle-json-fifo")
    (ws["bundle_json_fifo"] / "bundle.json").unlink()
    os.mkfifo(ws["bundle_json_fifo"] / "bundle.json")
    ws["bundle_pack_fifo"] = bundle_copy("bundle-pack-fifo")
    pack_file = next((ws["bundle_pack_fifo"] / "packs").iterdir())
    pack_file.unlink()
    os.mkfifo(pack_file)
    return {name: str(value) for name, value in ws.items()}


def _api_calls(ws: dict[str, str]) -> dict:
    from savpack_runtime import Classifier, Pack

    return {
        "classifier_altered": lambda: Classifier.load(ws["bundle_altered"]),
        "classifier_threads": lambda: Classifier.load(ws["bundle"], threads=0),
        "classifier_batch_size": lambda: Classifier.load(ws["bundle"], batch_size=0),
        "pack_fifo": lambda: Pack.load(ws["fifo"]),
        "pack_dev_zero": lambda: Pack.load("/dev/zero"),
        "pack_surrogate": lambda: Pack.load(ws["surrogate_inner"]),
        "probability_vote_format_1": lambda: _probability_vote_on_format_1(ws["pack"]),
    }


def _probability_vote_on_format_1(pack_path: str) -> None:
    """The `probability` vote asked of a pack without calibration (format 1) must say what is missing."""
    import numpy as np

    from savpack_runtime import Pack
    from savpack_runtime.scoring import pack_decision

    pack = Pack.load(pack_path).replace(scoring=None, probe_weight=None, probe_bias=None)
    pack_decision(pack, np.zeros((1, pack.k, pack.grid[2]), dtype=np.float32), method="probability")


# -- running one row in a forked child ---------------------------------------------------------------------------------

def _memory_kib() -> dict[str, int]:
    with open("/proc/self/status") as status:
        return {key: int(value.split()[0]) for key, value in (line.split(":", 1) for line in status)
                if key in ("VmHWM", "VmRSS", "VmSize")}


def _invoke(row: Row, ws: dict[str, str]) -> dict:
    """Run the row here (in the child); returns exit code, output and whether a traceback escaped."""
    import shlex

    for name in row.block:
        sys.modules[name] = None  # `import name` now raises ImportError, as when the extra is not installed
    kind, _, rest = row.command.partition(" ")
    if kind == "api":
        from savpack_runtime.errors import SavpackError

        try:
            _api_calls(ws)[rest]()
            return {"code": 0, "output": "", "crash": None}
        except SavpackError as exc:
            return {"code": 1, "output": f"{type(exc).__name__}: {exc}", "crash": None}
    argv = [part.format(**ws) for part in shlex.split(rest)]
    if kind == "savpack":
        from click.testing import CliRunner

        from savpack.cli import main

        result = CliRunner().invoke(main, argv)
        crash = None if result.exception is None or isinstance(result.exception, SystemExit) else repr(result.exception)
        return {"code": result.exit_code, "output": result.output, "crash": crash}
    from savpack_runtime.cli import main as run_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run_main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return {"code": code, "output": out.getvalue() + err.getvalue(), "crash": None}


def _run_forked(row: Row, ws: dict[str, str]) -> dict:
    reader, writer = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(reader)
            size = _memory_kib()["VmSize"] << 10
            resource.setrlimit(resource.RLIMIT_AS, (size + HEADROOM, resource.RLIM_INFINITY))
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the inherited RSS
            baseline = _memory_kib()["VmRSS"]
            try:
                result = _invoke(row, ws)
            except BaseException as exc:  # a traceback: the row fails with it
                import traceback

                result = {"code": None, "output": "", "crash": traceback.format_exc()[-3000:]}
            result["peak_mb"] = (_memory_kib()["VmHWM"] - baseline) / 1024
            result["output"] = result["output"][-6000:]
            payload = json.dumps(result).encode()
            view = memoryview(payload)
            while view:
                view = view[os.write(writer, view):]
        finally:
            os._exit(0)
    os.close(writer)
    chunks, deadline = [], started + row.seconds
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"hung": True, "elapsed": time.monotonic() - started}
            ready, _, _ = select.select([reader], [], [], remaining)
            if ready:
                chunk = os.read(reader, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(reader)
    os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b'{"code": null, "output": "", "crash": "the child died without a result"}')
    result["elapsed"] = time.monotonic() - started
    return result


def _digest(path: str) -> str:
    target = Path(path)
    hasher = hashlib.sha256()
    for file in sorted([target] if target.is_file() else (p for p in target.rglob("*") if p.is_file())):
        hasher.update(str(file.relative_to(target) if file != target else "").encode() + file.read_bytes())
    return hasher.hexdigest()


@pytest.mark.parametrize("row", TABLE, ids=[row.id for row in TABLE])
def test_hostile_input(row, workspace):
    kept = {name: _digest(workspace[name]) for name in row.keep}
    result = _run_forked(row, workspace)
    if os.environ.get("SAVPACK_HOSTILE_REPORT"):  # one JSON line per row: what the bounds are measured against
        with open(os.environ["SAVPACK_HOSTILE_REPORT"], "a") as report:
            report.write(json.dumps({"id": row.id, "seconds": round(result["elapsed"], 3), "peak_mb": round(result.get("peak_mb", -1), 1),
                                     "bound_seconds": row.seconds, "bound_mb": row.megabytes}) + "\n")
    assert not result.get("hung"), f"{row.command}: still running after {row.seconds} s (killed)"
    assert result["crash"] is None, f"{row.command}: traceback\n{result['crash']}"
    output = result["output"]
    assert result["code"] == row.code, f"{row.command}: exit {result['code']}, expected {row.code}\n{output}"
    assert row.fragment.format(**workspace) in output, f"{row.command}: message lacks {row.fragment!r}\n{output}"
    assert "Traceback" not in output, output
    if row.code != 0 and not row.command.startswith(("api", "savpack verify")):  # verify reports a list of checks
        message = [line for line in output.splitlines() if line.startswith(("Error:", "error:", "savpack-run"))]
        assert message, f"{row.command}: no one-line error message\n{output}"
    assert result["peak_mb"] <= row.megabytes, f"{row.command}: peak memory {result['peak_mb']:.0f} MB > {row.megabytes} MB"
    for name, digest in kept.items():
        assert _digest(workspace[name]) == digest, f"{row.command}: changed the input {name}"


def test_every_row_is_documented():
    text = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    documented = set(re.findall(r"[a-z0-9][a-z0-9-]*", text))  # whole ids: "pack-fifo" is not "bundle-pack-fifo"
    missing = [row.id for row in TABLE if row.id not in documented]
    assert not missing, f"docs/errors.md lacks the rows {missing}"
