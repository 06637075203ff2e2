"""Text and JSON renderings of what the builder reports: evaluation reports, the baselines table, pack summaries.

Shared by the CLI and the demo; nothing here computes a number, it only lays numbers out.
"""

from __future__ import annotations

import json
from typing import Any

from savpack_runtime import Pack
from savpack_runtime.scoring import scoring_summary

BASELINE_NAMES = {"zero_shot": "zero-shot (label words)", "knn_1": "kNN k=1 (final hidden)",
                  "knn_5": "kNN k=5 (final hidden)", "linear_probe": "linear probe (final hidden)",
                  "best_2_layers": "best 2 layers", "all_heads": "all heads vote"}


def format_report(report: dict[str, Any]) -> str:
    """An evaluation report (pipeline.evaluate) as text: accuracies, per-class accuracy, the confusion matrix."""
    labels = report["labels"]
    lines = [
        f"examples           {report['examples']}" + (f"  ({report['skipped_training_examples']} training examples skipped)" if report.get("skipped_training_examples") else ""),
        f"accuracy           {report['accuracy']:.4f}",
        f"balanced accuracy  {report['balanced_accuracy']:.4f}",
        f"macro F1           {report['macro_f1']:.4f}",
        "",
        "per-class accuracy",
    ]
    width = max(len(label) for label in labels)
    for label, accuracy in report["per_class_accuracy"].items():
        lines.append(f"  {label:<{width}}  {accuracy:.4f}")
    lines += ["", "confusion (rows: true, columns: predicted)"]
    cell = max(6, max(len(label) for label in labels))
    lines.append(" " * (width + 2) + "".join(f"{label[:cell]:>{cell + 1}}" for label in labels))
    for label, row in zip(labels, report["confusion"]):
        lines.append(f"  {label:<{width}}" + "".join(f"{count:>{cell + 1}}" for count in row))
    if "calibration" in report:
        lines += ["", format_calibration(report["calibration"])]
    return "\n".join(lines)


def format_calibration(calibration: dict[str, Any]) -> str:
    """The calibration block of an evaluation report: what the probabilities are, ECE, Brier, log loss, and the
    accuracy when only the most confident items are kept."""
    coverage = "  ".join(f"{share} {accuracy:.4f}" for share, accuracy in calibration["accuracy_at_coverage"].items())
    return "\n".join([
        f"probabilities      {calibration['probabilities']}",
        f"ECE (15 bins)      {calibration['ece']:.4f}",
        f"Brier score        {calibration['brier']:.4f}",
        f"log loss           {calibration['log_loss']:.4f}",
        f"accuracy at coverage (most confident first)  {coverage}",
    ])


def format_baselines(report: dict[str, Any], k: int) -> str:
    """The SAV pack beside every baseline of `eval --baselines`, one row each, and why any baseline did not run."""
    rows = [(f"SAV pack (k={k})", report)] + [(BASELINE_NAMES.get(name, name), values)
                                              for name, values in report["baselines"].items()]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'method':<{width}}  accuracy  balanced  macro-F1"]
    lines += [f"{name:<{width}}  {values['accuracy']:>8.4f}  {values['balanced_accuracy']:>8.4f}  {values['macro_f1']:>8.4f}"
              for name, values in rows]
    lines += [f"{BASELINE_NAMES.get(name, name):<{width}}  not run: {reason}" for name, reason in report["baselines_skipped"].items()]
    return "\n".join(lines)


def pack_summary(pack: Pack, sha256: str) -> dict[str, Any]:
    """What `inspect --json` and `build --json` print: the pack's identity, model, heads, prompt and metrics, and
    the file's own sha256 (docs/format.md section 6: the content hash is the file's, whoever laid it out)."""
    return {
        "name": pack.name, "version": pack.version, "format_version": pack.format_version,
        "labels": list(pack.labels), "model": pack.model, "k": pack.k, "deepest_layer": pack.deepest_layer,
        "heads": [{"layer": int(layer), "head": int(head), "score": round(float(score), 6)}
                  for (layer, head), score in zip(pack.heads.tolist(), pack.head_scores)],
        "class_counts": dict(zip(pack.labels, pack.class_counts.tolist())),
        "prompt": pack.prompt, "selection": pack.selection, "metrics": pack.metrics,
        "classifier": pack.classifier, "scoring": pack.scoring, "probabilities": scoring_summary(pack),
        "dataset": {key: value for key, value in pack.dataset.items() if key != "example_digests"},
        "created_by": pack.created_by, "sha256": sha256,
    }


def format_pack_summary(pack: Pack, path: str, sha256: str) -> str:
    """pack_summary as text, with the voting heads as a table."""
    summary = pack_summary(pack, sha256)
    layers, heads, head_dim = pack.grid
    model = pack.model
    lines = [
        f"pack        {path}" + (f"  ({pack.name} {pack.version or ''})" if pack.name else ""),
        f"labels      {', '.join(pack.labels)}",
        f"model       {model['id']}  [{model['family']}, revision {str(model['revision'])[:20]}]",
        f"grid        {layers} layers x {heads} heads x {head_dim} head_dim",
        f"heads       k = {pack.k}, deepest layer {pack.deepest_layer}, scoring {pack.selection.get('scoring')}, vote {pack.selection.get('vote')}",
        f"classifier  {pack.classifier}; probabilities: {scoring_summary(pack)}",
        f"prompt      {pack.prompt['template']!r}, heads read at the {pack.token_position} token",
        f"examples    {summary['class_counts']}",
        f"metrics     {json.dumps(pack.metrics)}",
        f"sha256      {summary['sha256']}",
        "",
        "  layer  head  accuracy",
    ]
    lines += [f"  {h['layer']:>5}  {h['head']:>4}  {h['score']:.4f}" for h in summary["heads"]]
    return "\n".join(lines)
