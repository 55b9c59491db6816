"""Out-of-distribution benchmark sets (generated, seeded, nothing downloaded) and OOD scores.

Far-OOD sets are inputs a Fashion-MNIST classifier should refuse: MNIST-like digits
(scikit-learn's bundled 8x8 digits upsampled), letters and digits rendered from the system's
fonts, noise, constant images, checkerboards, stripes and colour-inverted Fashion-MNIST.
Near-OOD sets (rotated, pixel-shuffled, blurred test images) are reported only: they keep most
of the statistics of clothing and no score is expected to separate them well.

Scores follow one convention: higher means more out of distribution. :class:`Mahalanobis`
fits class means and one tied covariance to features and is what the exported graphs carry.
"""

from __future__ import annotations

import glob
import string
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

FONT_GLOB = "/usr/share/fonts/truetype/dejavu/*.ttf"

FAR_OOD = (
    "mnist_digits",
    "font_glyphs",
    "uniform_noise",
    "gaussian_noise",
    "constant_black",
    "constant_white",
    "constant_grey",
    "checkerboard",
    "stripes",
    "fashion_inverted",
)
NEAR_OOD = ("rotated_90", "rotated_180", "pixel_shuffled", "blurred")


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def mnist_like_digits(n: int, rng: np.random.Generator) -> np.ndarray:
    """scikit-learn's 8x8 handwritten digits, upsampled to 20x20 and centred in 28x28 as MNIST is."""
    from sklearn.datasets import load_digits

    digits = load_digits().images  # [1797, 8, 8] in 0..16, ink high, as MNIST
    picked = digits[rng.choice(len(digits), size=n, replace=n > len(digits))]
    up = F.interpolate(torch.from_numpy(picked / 16.0).float()[:, None], size=(20, 20), mode="bilinear")
    out = np.zeros((n, 28, 28), dtype=np.float64)
    out[:, 4:24, 4:24] = up[:, 0].numpy() * 255.0
    return _u8(out)


def _fonts() -> list[ImageFont.FreeTypeFont | ImageFont.ImageFont]:
    paths = sorted(glob.glob(FONT_GLOB))
    return list(paths) or [None]  # type: ignore[list-item]


def font_glyphs(n: int, rng: np.random.Generator) -> np.ndarray:
    """Letters and digits from the system's TrueType fonts at random sizes and positions, light on dark.

    Without the fonts (Debian package fonts-dejavu-core) PIL's built-in bitmap font is used.
    """
    paths = _fonts()
    chars = string.ascii_letters + string.digits
    out = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        size = int(rng.integers(12, 27))
        path = paths[int(rng.integers(len(paths)))]
        font = ImageFont.truetype(path, size) if path else ImageFont.load_default()
        text = "".join(rng.choice(list(chars), size=int(rng.integers(1, 3))))
        canvas = Image.new("L", (28, 28), 0)
        draw = ImageDraw.Draw(canvas)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        # Anywhere the text fits; text wider than the canvas is cropped at a random place.
        x_lo, x_hi = sorted((-left, 28 - right))
        y_lo, y_hi = sorted((-top, 28 - bottom))
        x, y = int(rng.integers(x_lo, x_hi + 1)), int(rng.integers(y_lo, y_hi + 1))
        draw.text((x, y), text, fill=int(rng.integers(180, 256)), font=font)
        out[i] = np.asarray(canvas)
    return out


def checkerboards(n: int, rng: np.random.Generator) -> np.ndarray:
    """Checkerboards with random square size (1-7 px), phase and contrast."""
    yy, xx = np.indices((28, 28))
    out = np.empty((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        k = int(rng.integers(1, 8))
        dy, dx = rng.integers(0, k, size=2)
        lo, hi = sorted(rng.integers(0, 256, size=2))
        hi = max(hi, lo + 64)
        out[i] = _u8(np.where(((yy + dy) // k + (xx + dx) // k) % 2 == 0, lo, hi))
    return out


def stripes(n: int, rng: np.random.Generator) -> np.ndarray:
    """Horizontal, vertical or diagonal stripes with random period (2-10 px), phase and contrast."""
    yy, xx = np.indices((28, 28))
    out = np.empty((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        period = int(rng.integers(2, 11))
        coord = [yy, xx, yy + xx, yy - xx][int(rng.integers(4))]
        lo, hi = sorted(rng.integers(0, 256, size=2))
        hi = max(hi, lo + 64)
        on = (coord + int(rng.integers(period))) % period < max(1, period // 2)
        out[i] = _u8(np.where(on, hi, lo))
    return out


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(3 * sigma)
    t = np.arange(-radius, radius + 1)
    kernel = np.exp(-(t**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    x = torch.from_numpy(images.astype(np.float32))[:, None]
    k = torch.from_numpy(kernel.astype(np.float32))
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return _u8(x[:, 0].numpy())


def benchmark_sets(test_images: np.ndarray, n: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Every far- and near-OOD set, ``n`` uint8 [n, 28, 28] images each, the same for the same seed.

    ``test_images`` (Fashion-MNIST test images) are the source of the inverted and near-OOD sets.
    """
    rng = np.random.default_rng(seed)
    pick = test_images[rng.choice(len(test_images), size=n, replace=False)]
    makers: dict[str, Callable[[], np.ndarray]] = {
        "mnist_digits": lambda: mnist_like_digits(n, rng),
        "font_glyphs": lambda: font_glyphs(n, rng),
        "uniform_noise": lambda: rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8),
        "gaussian_noise": lambda: _u8(rng.normal(128, 64, size=(n, 28, 28))),
        "constant_black": lambda: np.zeros((n, 28, 28), np.uint8),
        "constant_white": lambda: np.full((n, 28, 28), 255, np.uint8),
        "constant_grey": lambda: np.full((n, 28, 28), 128, np.uint8),
        "checkerboard": lambda: checkerboards(n, rng),
        "stripes": lambda: stripes(n, rng),
        "fashion_inverted": lambda: 255 - pick,
        "rotated_90": lambda: np.rot90(pick, 1, axes=(1, 2)).copy(),
        "rotated_180": lambda: np.rot90(pick, 2, axes=(1, 2)).copy(),
        "pixel_shuffled": lambda: np.stack([rng.permutation(im.ravel()).reshape(28, 28) for im in pick]),
        "blurred": lambda: _blur(pick, 2.5),
    }
    return {name: make() for name, make in makers.items()}


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve with OOD as the positive class (ties count half): P(out > in)."""
    scores = np.concatenate([in_scores, out_scores]).astype(np.float64)
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    # Average ranks over ties.
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for f, c in zip(first[counts > 1], counts[counts > 1], strict=True):
        ranks[order[f : f + c]] = f + (c + 1) / 2
    n_in, n_out = len(in_scores), len(out_scores)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def fpr_at_95_tpr(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Fraction of in-distribution inputs flagged at the threshold that flags 95% of the OOD ones."""
    threshold = np.quantile(out_scores, 0.05, method="lower")
    return float((in_scores >= threshold).mean())


def max_softmax_score(logits: np.ndarray) -> np.ndarray:
    """Negative maximum softmax probability (Hendrycks & Gimpel 2017)."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return -p.max(axis=1)


def energy_score(logits: np.ndarray) -> np.ndarray:
    """Energy, -logsumexp(logits) (Liu et al. 2020)."""
    m = logits.max(axis=1, keepdims=True)
    return -(m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))


@dataclass(frozen=True)
class Mahalanobis:
    """Minimum over classes of the Mahalanobis distance with a tied covariance (Lee et al. 2018).

    ``whiten`` is the inverse square root of the (shrunk) covariance, so the squared distance is
    ``||(f - mean_c) @ whiten||^2``; the exported graph computes exactly that.
    """

    means: np.ndarray  # [classes, dims]
    whiten: np.ndarray  # [dims, dims]

    @staticmethod
    def fit(features: np.ndarray, labels: np.ndarray, classes: int, shrinkage: float = 1e-3) -> Mahalanobis:
        """Class means and the pooled within-class covariance, shrunk towards its mean eigenvalue."""
        f = features.astype(np.float64)
        means = np.stack([f[labels == c].mean(axis=0) for c in range(classes)])
        centred = f - means[labels]
        cov = centred.T @ centred / len(f)
        cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
        w, v = np.linalg.eigh(cov)
        whiten = v @ np.diag(1 / np.sqrt(np.clip(w, 1e-12, None))) @ v.T
        return Mahalanobis(means=means.astype(np.float32), whiten=whiten.astype(np.float32))

    def score(self, features: np.ndarray) -> np.ndarray:
        z = features.astype(np.float64) @ self.whiten
        mu = self.means.astype(np.float64) @ self.whiten
        d = (z**2).sum(1)[:, None] - 2 * z @ mu.T + (mu**2).sum(1)[None, :]
        return d.min(axis=1)


def ood_table(in_scores: np.ndarray, sets: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """AUROC and FPR at 95% TPR of one score for each OOD set against the in-distribution scores."""
    return {
        name: {"auroc": round(auroc(in_scores, s), 4), "fpr95": round(fpr_at_95_tpr(in_scores, s), 4)}
        for name, s in sets.items()
    }
