"""Tile images into one PNG grid."""

from __future__ import annotations

import math

import numpy as np

from services.core.images import encode_png


def grid_png(images: np.ndarray, columns: int | None = None, pad: int = 2) -> bytes:
    """[N,1,28,28] (or [N,28,28]) in [0,1] -> one PNG, ``columns`` wide (default: about square)."""
    tiles = np.clip(np.asarray(images, dtype=np.float32).reshape(len(images), 28, 28), 0, 1)
    cols = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    grid = np.full((rows * (28 + pad) + pad, cols * (28 + pad) + pad), 0.35, dtype=np.float32)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[pad + r * (28 + pad) : pad + r * (28 + pad) + 28, pad + c * (28 + pad) : pad + c * (28 + pad) + 28] = tile
    return encode_png(grid)
