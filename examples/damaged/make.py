"""Make the damaged examples the README restores: a noisy shirt, an occluded one and its mask.

    .venv/bin/python examples/damaged/make.py

examples/images/shirt.png at 28x28 (the model's size) with Gaussian noise of sigma 0.3 (seed 0),
and with a 10x12 grey rectangle over it; the mask is white where the rectangle is.
"""

from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
shirt = np.asarray(Image.open(HERE.parent / "images" / "shirt.png").convert("L").resize((28, 28)), np.float32) / 255
noisy = np.clip(shirt + np.random.default_rng(0).normal(0.0, 0.3, shirt.shape), 0.0, 1.0)
Image.fromarray((noisy * 255).round().astype(np.uint8), mode="L").save(HERE / "noisy-shirt.png")
mask = np.zeros_like(shirt, dtype=bool)
mask[9:19, 8:20] = True
occluded = np.where(mask, 0.5, shirt)
Image.fromarray((occluded * 255).round().astype(np.uint8), mode="L").save(HERE / "occluded-shirt.png")
Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(HERE / "occluded-shirt-mask.png")
