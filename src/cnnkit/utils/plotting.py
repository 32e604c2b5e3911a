"""PNG plots for run directories (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from cnnkit.utils.io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, bbox_inches="tight", format="png"))
    _plt().close(fig)


def plot_curves(history: Sequence[dict[str, Any]], path: Path, metric_keys: Sequence[str]) -> None:
    """Loss curves (train/val) and the given metrics per epoch, side by side."""
    plt = _plt()
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, style in (("train_loss", "-o"), ("val_loss", "-s")):
        ys = [r.get(key) for r in history]
        if any(y is not None for y in ys):
            axes[0].plot(epochs, ys, style, ms=3, label=key)
    axes[0].set(title="loss", xlabel="epoch")
    axes[0].legend()
    for key in metric_keys:
        ys = [r.get(key) for r in history]
        if any(y is not None for y in ys):
            axes[1].plot(epochs, ys, "-o", ms=3, label=key)
    axes[1].set(title="validation metrics", xlabel="epoch")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path,
                   title: str = "confusion matrix") -> None:
    """Row-normalized confusion matrix with counts in the cells."""
    plt = _plt()
    m = np.asarray(matrix, dtype=float)
    norm = m / np.clip(m.sum(1, keepdims=True), 1, None)
    n = len(classes)
    size = min(14, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_yticklabels(classes)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)


def plot_image_grid(images: Sequence[np.ndarray], titles: Sequence[str], path: Path,
                    colors: Sequence[str] | None = None, cols: int = 8) -> None:
    """A grid of HxW or HxWx3 images (floats in [0, 1] or uint8) with a title each."""
    plt = _plt()
    n = len(images)
    cols = min(cols, max(1, n))
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (img, title) in enumerate(zip(images, titles)):
        ax = axes.flat[k]
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1 if img.dtype != np.uint8 else 255)
        ax.set_title(title, fontsize=7, color=(colors[k] if colors else "black"))
    _save(fig, path)


def denormalize(img, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalized tensor (C, H, W) back to a displayable HxW or HxWx3 float array in [0, 1]."""
    x = img.detach().float().cpu().numpy()
    x = x * np.asarray(std, dtype=np.float32)[:, None, None] + np.asarray(mean, dtype=np.float32)[:, None, None]
    x = np.clip(x, 0, 1)
    return x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)


def plot_lines(x: Sequence[float], series: dict[str, Sequence[float]], path: str | Path, xlabel: str = "",
               ylabel: str = "", title: str = "") -> None:
    """One line per named series over shared x values (e.g. accuracy against missing share)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        ax.plot(x, ys, "-o", ms=4, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, Path(path))
