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


def recall_heatmaps(summary: dict, lengths: list[int], depths: list[float], path: Path) -> Path:
    """One heatmap per task: accuracy by context length (x) and needle depth (y)."""
    import numpy as np

    plt = _pyplot()
    tasks = list(summary)
    width = 1.5 + len(tasks) * (1.0 + 0.8 * len(lengths))
    fig, axes = plt.subplots(1, len(tasks), figsize=(width, 0.45 * len(depths) + 2.4), squeeze=False)
    image = None
    for k, (ax, task) in enumerate(zip(axes[0], tasks)):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for j, length in enumerate(lengths):
            for i, depth in enumerate(depths):
                value = summary[task].get(str(length), {}).get(f"{depth:g}")
                if value is not None:
                    grid[i, j] = value
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if k == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(f"{task} (mean {np.nanmean(grid):.2f})" if not np.isnan(grid).all() else task)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    path = _save(fig, Path(path))
    plt.close(fig)
    return path


def loss_by_position(perplexity: dict, path: Path, title: str = "") -> Path:
    """Mean token loss per position bucket."""
    plt = _pyplot()
    buckets = [b for b in perplexity["buckets"] if b["mean_loss"] is not None]
    centers = [(b["start"] + b["end"]) / 2 for b in buckets]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(centers, [b["mean_loss"] for b in buckets], marker="o")
    ax.set_xlabel("token position")
    ax.set_ylabel("mean loss (nats / token)")
    ax.set_title(title or f"loss by position ({perplexity['seq_length']} tokens)")
    ax.grid(alpha=0.3)
    path = _save(fig, Path(path))
    plt.close(fig)
    return path
