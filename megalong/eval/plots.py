"""PNG plots of the results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    # Written under a temporary name and renamed: never a half-written PNG.
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def _length_label(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def recall_heatmaps(models: list[tuple[str, dict]], lengths: list[int], depths: list[float], path: Path) -> Path:
    """Accuracy by context length (x) and needle depth (y): one row of panels per model
    (``(label, summary by task -> length -> depth)``), one panel per task."""
    import numpy as np

    plt = _pyplot()
    tasks = list(dict.fromkeys(task for _, summary in models for task in summary))
    width = 1.5 + len(tasks) * (1.0 + 0.8 * len(lengths))
    height = len(models) * (0.45 * len(depths) + 1.7) + 0.8
    fig, axes = plt.subplots(len(models), len(tasks), figsize=(width, height), squeeze=False)
    image = None
    for row, (label, summary) in enumerate(models):
        for col, task in enumerate(tasks):
            ax = axes[row][col]
            grid = np.full((len(depths), len(lengths)), np.nan)
            for j, length in enumerate(lengths):
                for i, depth in enumerate(depths):
                    value = summary.get(task, {}).get(str(length), {}).get(f"{depth:g}")
                    if value is not None:
                        grid[i, j] = value
            image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    if not np.isnan(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            if row == len(models) - 1:
                ax.set_xlabel("context length (tokens)")
            if col == 0:  # the model's label heads its row
                ax.set_ylabel(f"{label}\nneedle depth")
            mean = "" if np.isnan(grid).all() else f" (mean {np.nanmean(grid):.2f})"
            ax.set_title(f"{task}{mean}", fontsize=10)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="accuracy")
    path = _save(fig, Path(path))
    plt.close(fig)
    return path


def loss_by_position(models: list[tuple[str, dict]], path: Path) -> Path:
    """Mean token loss per position bucket, one line per model (``(label, perplexity result)``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, perplexity in models:
        buckets = [b for b in perplexity["buckets"] if b["mean_loss"] is not None]
        centers = [(b["start"] + b["end"]) / 2 for b in buckets]
        ax.plot(centers, [b["mean_loss"] for b in buckets], marker="o", markersize=3,
                label=f"{label} (ppl {perplexity['perplexity']:.4g})")
    ax.set_xlabel("token position")
    ax.set_ylabel("mean loss (nats / token)")
    ax.set_title(f"loss by position ({models[0][1]['seq_length']} tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = _save(fig, Path(path))
    plt.close(fig)
    return path
