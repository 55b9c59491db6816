"""Fashion-MNIST from IDX files, and a small fake dataset for smoke tests.

The Debian package ``dataset-fashion-mnist`` installs the four IDX files (gzipped) in
``/usr/share/datasets/fashion-mnist/``. Any directory holding MNIST-format IDX files, gzipped
or not, works the same way, so nothing here downloads anything.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.core.manifest import file_sha256  # noqa: F401 - the one checksum helper, for the scripts

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes (http://yann.lecun.com/exdb/mnist/ file format section).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class Split:
    """One split: ``images`` uint8 [N, 28, 28] (white object on black), ``labels`` int64 [N]."""

    images: np.ndarray
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise ValueError(f"{path}: unknown IDX type code {raw[2]:#x}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    data = np.frombuffer(raw, dtype=dtype, offset=offset)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"{directory / stem}[.gz] not found: install the Debian package dataset-fashion-mnist "
        "or pass --data-dir pointing at a directory of MNIST-format IDX files"
    )


def load_split(split: str, data_dir: Path | str | None = None) -> Split:
    """Load ``train`` or ``test`` from ``data_dir`` (default: the Debian package's directory)."""
    directory = Path(data_dir or os.environ.get("NNSERVE_DATA_DIR") or DEFAULT_DATA_DIR)
    image_path, label_path = (_find(directory, stem) for stem in _FILES[split])
    images = read_idx(image_path)
    labels = read_idx(label_path).astype(np.int64)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_path}: shape {images.shape} does not match {labels.shape[0]} labels")
    return Split(images=np.ascontiguousarray(images), labels=labels, source=str(image_path))


def fake_split(n: int, seed: int = 0) -> Split:
    """A tiny learnable stand-in for Fashion-MNIST: each class is a bright bar at its own place.

    Used by ``--dry-run`` so that scripts and their tests run in seconds without the dataset.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(LABELS), size=n).astype(np.int64)
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        row = 2 + 2 * int(label)
        images[i, row : row + 3, 4:24] = 220
    return Split(images=images, labels=labels, source=f"fake(n={n}, seed={seed})")


def split_train_val(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """(fit, validation): ``val_size`` images of ``train`` held out at random, drawn with ``seed``."""
    order = np.random.default_rng(seed).permutation(len(train))
    val_idx, train_idx = order[:val_size], order[val_size:]
    return (
        Split(train.images[train_idx], train.labels[train_idx], train.source),
        Split(train.images[val_idx], train.labels[val_idx], train.source),
    )
