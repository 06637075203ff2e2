"""Plots (matplotlib, extra `plot`): the head map (every head's score as a layers x heads heatmap, the selected heads
marked) and the calibration of an evaluation (reliability diagram, risk-coverage curve)."""

from __future__ import annotations

import io
import os
import textwrap
from pathlib import Path

import numpy as np

from savpack_runtime import files

from .errors import MissingExtraError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("plotting needs matplotlib: pip install 'savpack[plot]'") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_head_map(scores: np.ndarray, path: str | os.PathLike, selected: np.ndarray | None = None,
                  title: str = "", force: bool = False, label: str = "accuracy (labelled set)",
                  marked: str = "the {k} selected heads") -> Path:
    """Write a PNG heatmap of `scores` (layers, heads); `selected` (k, 2) heads are outlined. Atomic write."""
    plt = _pyplot()
    scores = np.asarray(scores, dtype=np.float32)
    layers, heads = scores.shape
    width = min(12.0, max(4.5, 2.5 + 0.3 * heads))
    height = min(12.0, max(3.0, 1.5 + 0.22 * layers))
    figure, axes = plt.subplots(figsize=(width, height), dpi=100)
    image = axes.imshow(scores, aspect="auto", cmap="viridis", origin="upper", interpolation="nearest")
    figure.colorbar(image, ax=axes, label=label, fraction=0.06)
    if selected is not None and len(selected):
        axes.scatter(np.asarray(selected)[:, 1], np.asarray(selected)[:, 0], s=16, facecolors="none",
                     edgecolors="red", linewidths=1.0)
        title = f"{title}\n" if title else ""
        title += "red circles: " + marked.format(k=len(selected))
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    step = max(1, layers // 12)
    axes.set_yticks(range(0, layers, step))
    axes.set_xticks(range(0, heads, max(1, heads // 16)))
    if title:
        # Wrapped to the figure's width (about 12 characters an inch at this font size), so no title is cut off.
        lines = [wrapped for line in title.split("\n") for wrapped in textwrap.wrap(line, int(width * 12)) or [""]]
        axes.set_title("\n".join(lines), fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return files.atomic_write(path, lambda handle: handle.write(buffer.getvalue()), force)


def plot_calibration(calibration: dict, path: str | os.PathLike, title: str = "", force: bool = False) -> Path:
    """Write a PNG of an evaluation's calibration (savpack.metrics.calibration_report): the reliability diagram
    (accuracy against mean confidence per bin, bar width = bin, the diagonal = perfect calibration) and the
    risk-coverage curve (accuracy of the most confident items against the share kept). Atomic write."""
    plt = _pyplot()
    figure, (reliability, coverage) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100)
    bins = calibration["reliability"]
    reliability.bar([b["low"] for b in bins], [b["accuracy"] for b in bins], width=[b["high"] - b["low"] for b in bins],
                    align="edge", color="#4c72b0", edgecolor="white", label="accuracy in bin")
    reliability.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="#dd8452",
                     label="mean confidence in bin")
    reliability.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfectly calibrated")
    reliability.set(xlim=(0, 1), ylim=(0, 1), xlabel="top probability", ylabel="accuracy",
                    title=f"reliability (ECE {calibration['ece']:.3f}, Brier {calibration['brier']:.3f})")
    reliability.legend(fontsize=8, loc="upper left")
    curve = calibration["coverage_curve"]
    coverage.plot([p["coverage"] for p in curve], [p["accuracy"] for p in curve], "-o", markersize=3, color="#4c72b0")
    coverage.set(xlim=(0, 1.02), xlabel="coverage (most confident items first)", ylabel="accuracy",
                 title="risk-coverage")
    coverage.grid(alpha=0.3)
    source = calibration.get("probabilities", "")
    figure.suptitle("\n".join(filter(None, [title, f"probabilities: {source}"])), fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return files.atomic_write(path, lambda handle: handle.write(buffer.getvalue()), force)
