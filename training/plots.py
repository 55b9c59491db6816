"""PNG figures for model cards: training curves and image grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_curves(history: Sequence[dict[str, float]], keys: Sequence[str], path: Path, title: str) -> None:
    """Plot ``keys`` of per-epoch ``history`` rows against the epoch number."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    epochs = [h["epoch"] for h in history]
    for key in keys:
        ax.plot(epochs, [h[key] for h in history], marker="o", label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_grid(rows: Sequence[np.ndarray], path: Path, scale: int = 3, labels: Sequence[str] | None = None) -> None:
    """Save rows of [N,1,28,28] (or [N,28,28]) images in [0,1] as one grayscale PNG grid."""
    from PIL import Image

    arrays = [np.clip(np.asarray(r, dtype=np.float32).reshape(len(r), 28, 28), 0, 1) for r in rows]
    cols = max(len(a) for a in arrays)
    pad = 2
    grid = np.ones((len(arrays) * (28 + pad) + pad, cols * (28 + pad) + pad), np.float32) * 0.5
    for i, row in enumerate(arrays):
        for j, image in enumerate(row):
            top, left = pad + i * (28 + pad), pad + j * (28 + pad)
            grid[top : top + 28, left : left + 28] = image
    img = Image.fromarray((grid * 255).round().astype(np.uint8), mode="L")
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(path)
