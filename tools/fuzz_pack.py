"""Fuzz the pack reader: raw bytes, byte-level damage to valid packs, and structural edits of their header.

The only exceptions allowed out of `Pack.from_bytes` are savpack's named pack errors (PackError subclasses); anything
else is a crash. Each case runs under a time limit (a hang is a failure) and the process under a memory limit (an
allocation driven by hostile sizes is a failure). Prints a table, writes JSON.

    python tools/fuzz_pack.py --cases 100000 --seed 0 --out fuzz.json   # the full run
    python tools/fuzz_pack.py --cases 2000 --seed 1 --out fuzz.json     # a quick one (CI runs a seeded short run as a test)
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import struct
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings
from hypothesis import strategies as st

from measure import write_results
from savpack_runtime import Pack, files
from savpack_runtime import format as fmt
from savpack_runtime.errors import PackError

MEMORY_LIMIT_BYTES = 2 * 1024**3


class CaseTimeout(Exception):
    pass


def valid_packs() -> list[bytes]:
    """Legal packs of several shapes: the seeds every mutation starts from."""
    packs = []
    for k, classes, grid in [(1, 2, (1, 1, 2)), (3, 2, (4, 5, 6)), (5, 4, (6, 8, 3))]:
        rng = np.random.default_rng(k)
        layers, heads, head_dim = grid
        chosen = rng.choice(layers * heads, size=k, replace=False)
        pack = Pack(
            heads=np.stack([chosen // heads, chosen % heads], axis=1).astype(np.int32),
            centroids=rng.normal(size=(k, classes, head_dim)).astype(np.float32),
            head_scores=rng.uniform(size=k).astype(np.float32),
            class_counts=np.arange(1, classes + 1, dtype=np.int32),
            all_head_scores=rng.uniform(size=(layers, heads)).astype(np.float32),
            labels=tuple(f"label {i} é" for i in range(classes)),
            model={"id": "org/m", "revision": "r", "family": "qwen2_vl", "grid": list(grid), "fingerprint": "f"},
            prompt={"template": "{text}", "rendered": "<u>{text}</u>", "image_count": 0, "chat_template_sha256": None},
            selection={"k": k, "scoring": "paper"}, metrics={"train_accuracy": 1.0}, name="n", version="1.0.0",
            created_by={"savpack": "0"}, dataset={"sha256": "0", "examples": 3},
        )
        packs.append(pack.to_bytes())
    return packs


SEEDS = valid_packs()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6),
    max_leaves=20,
)


@st.composite
def byte_damage(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        action = draw(st.sampled_from(["flip", "truncate", "append", "insert", "delete"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[position] = draw(st.integers(0, 255))
        elif action == "truncate":
            del data[position:]
        elif action == "append":
            data += draw(st.binary(min_size=1, max_size=64))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[position : position + draw(st.integers(1, 16))]
    return bytes(data)


@st.composite
def header_edits(draw) -> bytes:
    """Decode a valid header, replace or delete a value anywhere in it, re-encode (with a right or wrong length)."""
    data = draw(st.sampled_from(SEEDS))
    (size,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8 : 8 + size]), data[8 + size :]
    for _ in range(draw(st.integers(1, 3))):
        entry_name = draw(st.sampled_from(sorted(header)))
        entry = header[entry_name]
        field = draw(st.sampled_from(sorted(entry)))
        if draw(st.booleans()) and entry_name == "__metadata__" and field.startswith(fmt.META_PREFIX):
            # a metadata value: a different JSON document, stored as the string the format expects
            entry[field] = json.dumps(draw(json_values)) if draw(st.booleans()) else draw(st.text(max_size=40))
        elif draw(st.integers(0, 5)) == 0:
            del entry[field]
        else:
            entry[field] = draw(json_values)
    encoded = json.dumps(header).encode()
    length = len(encoded) + draw(st.sampled_from([0, 0, 0, -1, 1, 8, 10**6]))
    return struct.pack("<Q", max(length, 0)) + encoded + body


@st.composite
def tensor_edits(draw) -> bytes:
    """A well-formed safetensors file whose tensors have the wrong dtypes, shapes or values for a pack."""
    tensors, metadata = files.loads(draw(st.sampled_from(SEEDS)))
    tensors = {name: np.array(value) for name, value in tensors.items()}
    name = draw(st.sampled_from(sorted(tensors)))
    dtype = np.dtype(fmt.DTYPES[draw(st.sampled_from(sorted(fmt.DTYPES)))])
    shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=4))
    fill = draw(st.sampled_from([0, 1, -1, 2**31 - 1, float("nan"), float("inf"), 1e30]))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensors[name] = np.full(shape, fill).astype(dtype)
    return files.dumps(tensors, metadata)


cases = st.one_of(st.binary(max_size=2048), byte_damage(), header_edits(), tensor_edits())


def run(case_count: int, seed: int, time_limit: float = 2.0) -> dict:
    outcomes: Counter[str] = Counter()
    crashes: list[dict] = []
    slowest = {"seconds": 0.0, "size": 0}

    def on_alarm(signum, frame):
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)

    @hypothesis_seed(seed)
    @settings(max_examples=case_count, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=["generate"])
    @given(cases)
    def one_case(data: bytes) -> None:
        started = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, time_limit)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                Pack.from_bytes(data, path="<fuzz>")
            outcomes["accepted"] += 1
        except PackError as exc:
            outcomes[type(exc).__name__] += 1
        except CaseTimeout:
            crashes.append({"kind": "timeout", "data": data[:256].hex(), "size": len(data)})
        except Exception as exc:  # noqa: BLE001 - anything else is the crash we are looking for
            crashes.append({"kind": type(exc).__name__, "message": str(exc)[:200], "data": data[:256].hex(),
                            "size": len(data), "trace": traceback.format_exc(limit=4)[-600:]})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        elapsed = time.perf_counter() - started
        if elapsed > slowest["seconds"]:
            slowest.update(seconds=elapsed, size=len(data))

    started = time.perf_counter()
    try:
        one_case()
    finally:
        signal.signal(signal.SIGALRM, previous)
    total = sum(outcomes.values()) + len(crashes)
    return {"cases": total, "crashes": len(crashes), "crash_examples": crashes[:10],
            "slowest_case_seconds": round(slowest["seconds"], 6), "slowest_case_bytes": slowest["size"],
            "seconds": round(time.perf_counter() - started, 1), "seed": seed, "time_limit_seconds": time_limit,
            "memory_limit_bytes": MEMORY_LIMIT_BYTES, "outcomes": dict(outcomes.most_common())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=2.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--out", type=Path, required=True, help="JSON results to write")
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    report = run(args.cases, args.seed, args.time_limit)
    write_results(args.out, report)
    print("| outcome | cases |\n|---|---|")
    for outcome, count in report["outcomes"].items():
        print(f"| {outcome} | {count} |")
    print(f"\ncases {report['cases']}, crashes {report['crashes']}, slowest case {report['slowest_case_seconds'] * 1000:.2f} ms "
          f"({report['slowest_case_bytes']} bytes), {report['seconds']} s; JSON: {args.out}")
    for crash in report["crash_examples"][:3]:
        print(json.dumps(crash, indent=2), file=sys.stderr)
    return 1 if report["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
