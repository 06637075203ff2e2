"""`savpack eval --record`: the held-out metrics written into the pack file (a new artifact with a new hash)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from savpack_runtime import Pack

from ..errors import SharingError
from .packfile import read_pack, read_sidecar, write_sidecar

HELD_OUT_PREFIX = "held_out_"


def record_held_out(path: str | Path, evaluated: Pack, report: dict[str, Any], examples: Sequence[Any]) -> tuple[Pack, str]:
    """Store `savpack eval`'s held-out metrics in the pack file (atomic rewrite); returns the new pack and its sha256.

    Replaces earlier held-out metrics. Refuses if the file changed since it was evaluated, or if it holds keys this
    savpack does not know (rewriting would drop them)."""
    from ..data import dataset_summary
    from ..pipeline import held_out

    data, on_disk = read_pack(path)
    if evaluated.to_bytes() != data:
        raise SharingError(f"{path}: the file is not the pack that was evaluated (changed meanwhile, or holds keys "
                           "this savpack does not know and would drop); nothing recorded")
    kept, _ = held_out(on_disk, examples)
    summary = dataset_summary([example.digest() for example in kept], [example.label for example in kept])
    metrics = {key: value for key, value in on_disk.metrics.items() if not key.startswith(HELD_OUT_PREFIX)}
    metrics.update({
        "held_out_examples": report["examples"],
        "held_out_accuracy": round(report["accuracy"], 6),
        "held_out_balanced_accuracy": round(report["balanced_accuracy"], 6),
        "held_out_macro_f1": round(report["macro_f1"], 6),
        "held_out_per_class_accuracy": {label: round(value, 6) for label, value in report["per_class_accuracy"].items()},
    })
    dataset = {**on_disk.dataset, "held_out": {key: summary[key] for key in ("sha256", "examples", "class_counts")}}
    updated = on_disk.replace(metrics=metrics, dataset=dataset)
    updated.save(path, force=True)
    digest = updated.content_hash()
    if read_sidecar(path) is not None:
        write_sidecar(path, digest)  # the user changed the pack on purpose; a stale sidecar would only mislead
    return updated, digest
