"""Corruptions the autoencoder learns to undo, as pure functions on torch batches in [0, 1].

Each returns ``(corrupted, damage_mask)``; the mask marks pixels the corruption replaced (zero
for additive noise, which touches every pixel a little).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

KINDS = ("clean", "gaussian", "salt_pepper", "rectangles", "strokes")


def gaussian(x: torch.Tensor, sigma: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive Gaussian noise with per-image sigma (on [0,1] pixels), clipped."""
    noisy = x + sigma.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)
    return noisy.clamp(0, 1), torch.zeros_like(x)


def salt_pepper(x: torch.Tensor, g: torch.Generator, max_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.rand(x.shape[0], 1, 1, 1, generator=g) * (max_fraction - 0.02) + 0.02
    hit = torch.rand(x.shape, generator=g) < p
    value = (torch.rand(x.shape, generator=g) < 0.5).float()
    return torch.where(hit, value, x), hit.float()


def rectangles(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One to three occluding rectangles (4-14 px a side) of black, white, gray or noise."""
    n = x.shape[0]
    mask = torch.zeros_like(x)
    fill = torch.empty_like(x)
    kind = torch.randint(0, 4, (n,), generator=g)
    gray = torch.rand(n, generator=g)
    noise = torch.rand(x.shape, generator=g)
    for i in range(n):
        k = int(kind[i])
        fill[i] = noise[i] if k == 3 else (0.0, 1.0, float(gray[i]))[k]
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            h, w = (int(v) for v in torch.randint(4, 15, (2,), generator=g))
            top, left = (
                int(torch.randint(0, 29 - h, (1,), generator=g)),
                int(torch.randint(0, 29 - w, (1,), generator=g)),
            )
            mask[i, :, top : top + h, left : left + w] = 1.0
    return torch.where(mask > 0, fill, x), mask


def stroke_bank(n: int, seed: int) -> torch.Tensor:
    """Watermark-like overlays drawn with PIL: lines, scribbles and short text. [n,1,28,28] in [0,1]."""
    rng = np.random.default_rng(seed)
    words = ["SAMPLE", "(c)", "DEMO", "2024", "nn", "XX", "COPY", "ok", "#1", "wm"]
    out = np.zeros((n, 1, 28, 28), np.float32)
    for i in range(n):
        canvas = Image.new("L", (56, 56), 0)
        draw = ImageDraw.Draw(canvas)
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.5:
                points = [tuple(int(v) for v in rng.integers(0, 56, 2)) for _ in range(rng.integers(2, 5))]
                draw.line(points, fill=255, width=int(rng.integers(2, 5)))
            else:
                xy = tuple(int(v) for v in rng.integers(0, 36, 2))
                draw.text(xy, str(rng.choice(words)), fill=255)
        out[i, 0] = np.asarray(canvas.resize((28, 28), Image.Resampling.BILINEAR), np.float32) / 255.0
    return torch.from_numpy(out)


def strokes(x: torch.Tensor, bank: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlay a random stroke/text pattern, light or dark, at 60-100% opacity."""
    n = x.shape[0]
    overlay = bank[torch.randint(0, len(bank), (n,), generator=g)]
    alpha = (torch.rand(n, 1, 1, 1, generator=g) * 0.4 + 0.6) * overlay
    ink = (torch.rand(n, 1, 1, 1, generator=g) < 0.7).float()  # mostly light ink, sometimes dark
    return x * (1 - alpha) + ink * alpha, (overlay > 0.25).float()


def corrupt(
    x: torch.Tensor, bank: torch.Tensor, g: torch.Generator, weights: tuple[float, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random corruption per image, drawn with ``weights`` over KINDS (default uniform).

    Returns (corrupted, damage_mask, kind index into KINDS).
    """
    n = x.shape[0]
    probabilities = torch.tensor(weights or [1.0] * len(KINDS), dtype=torch.float64)
    kind = torch.multinomial(probabilities, n, replacement=True, generator=g)
    out, mask = x.clone(), torch.zeros_like(x)
    for k, name in enumerate(KINDS):
        idx = (kind == k).nonzero().flatten()
        if len(idx) == 0 or name == "clean":
            continue
        xs = x[idx]
        if name == "gaussian":
            c, m = gaussian(xs, torch.rand(len(idx), generator=g) * 0.5, g)
        elif name == "salt_pepper":
            c, m = salt_pepper(xs, g)
        elif name == "rectangles":
            c, m = rectangles(xs, g)
        else:
            c, m = strokes(xs, bank, g)
        out[idx], mask[idx] = c, m
    return out, mask, kind
