"""What checking a bundle's weights digest costs at load: `Classifier.load` with the check (the default) against
`check_weights=False`, side by side in one process, interleaved, and the sha256 of the weights file alone.

    python tools/bench_digest.py BUNDLE [BUNDLE ...] [--repeats 5] [--threads 1] [--out digest.json]

Without BUNDLE, the golden bundles in exported/ (tiny). The page cache is warm (one untimed load first): this is the
cost of hashing bytes already in memory, as in a service that restarts; a cold read adds the disk's read time to both
the check and onnxruntime's own load of the same file. The machine is shared: compare the ratio, not the seconds.
Prints a table; --out writes every run as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(bundle: Path, repeats: int, threads: int) -> dict:
    from savpack_runtime import Classifier
    from savpack_runtime.bundle import Bundle
    from savpack_runtime.files import file_sha256

    weights = bundle / Bundle.load(bundle, check_weights=False).graph["data_file"]
    Classifier.load(bundle, threads=threads)  # warm the page cache and the imports
    runs = []
    for _ in range(repeats):
        run = {}
        for name, check in (("checked", True), ("unchecked", False)):
            gc.collect()
            started = time.perf_counter()
            classifier = Classifier.load(bundle, threads=threads, check_weights=check)
            run[f"load_{name}_s"] = time.perf_counter() - started
            del classifier
        started = time.perf_counter()
        file_sha256(weights)
        run["sha256_s"] = time.perf_counter() - started
        runs.append(run)
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    size = weights.stat().st_size
    return {"bundle": str(bundle), "weights_bytes": size, "runs": runs, "median": median,
            "added_s": median["load_checked_s"] - median["load_unchecked_s"],
            "ratio": median["load_checked_s"] / median["load_unchecked_s"],
            "sha256_mb_per_s": size / 1e6 / median["sha256_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="*", type=Path, help="bundle folders (default: the golden bundles)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (the machine is shared)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    bundles = args.bundles or sorted(path / "bundle" for path in (ROOT / "exported" / "bundles").iterdir()
                                     if (path / "bundle" / "bundle.json").is_file())
    results = {"repeats": args.repeats, "threads": args.threads, "python": sys.version.split()[0],
               "bundles": [measure(bundle, args.repeats, args.threads) for bundle in bundles]}
    print(f"{'bundle':<40} {'weights MB':>10} {'load checked s':>14} {'unchecked s':>11} {'added s':>8} "
          f"{'ratio':>6} {'sha256 MB/s':>11}")
    for entry in results["bundles"]:
        median = entry["median"]
        print(f"{Path(entry['bundle']).name[-40:]:<40} {entry['weights_bytes'] / 1e6:>10.1f} {median['load_checked_s']:>14.3f} "
              f"{median['load_unchecked_s']:>11.3f} {entry['added_s']:>8.3f} {entry['ratio']:>6.2f} "
              f"{entry['sha256_mb_per_s']:>11.0f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
