"""The model manifest: the one contract between export (training) and serving.

Training writes ``models/<name>/<version>/manifest.json`` with :func:`Manifest.write`; serving reads
it with :func:`Manifest.read`. Both sides import this module, so the schema cannot drift. It
depends on pydantic and numpy only (no torch, no grpc), and holds what both sides need besides the
schema: the dtype tables and the file checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1

DType = Literal["float32", "float16", "int64", "int32", "uint8", "bool"]
# The one dtype table: a manifest dtype as numpy's, and onnxruntime's type names as manifest dtypes.
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
ONNXRUNTIME_DTYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file (the checksum a manifest records and serving verifies)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class TensorSpec(BaseModel):
    """One graph input or output. ``-1`` marks a dynamic axis (the batch axis is always dynamic)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    dtype: DType
    shape: list[int]
    # Inclusive [low, high] of every value of an integer input that indexes something (a class
    # label, a timestep): serving refuses values outside it before they can reach a batch.
    range: tuple[int, int] | None = None


class Preprocessing(BaseModel):
    """How raw pixels become the model's input; serving applies exactly this."""

    model_config = ConfigDict(extra="forbid")

    color: Literal["grayscale"] = "grayscale"
    size: tuple[int, int] = (28, 28)
    scale: Literal["0-1"] = "0-1"
    background: Literal["dark", "light"] = "dark"
    description: str = ""


class OodCalibration(BaseModel):
    """Out-of-distribution score and the threshold it was calibrated to at training time."""

    model_config = ConfigDict(extra="forbid")

    score: Literal["energy", "max_softmax", "reconstruction_mse", "mahalanobis_energy"]
    threshold: float
    higher_is_more_ood: bool = True
    calibration: str


class TrainingInfo(BaseModel):
    """Provenance: what produced the file, so a reader can reproduce it."""

    model_config = ConfigDict(extra="allow")

    command: str
    seed: int
    data: str
    epochs: int
    duration_s: float
    hardware: str
    torch_version: str


class Manifest(BaseModel):
    """Everything serving needs to know about one model version."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: int = SCHEMA_VERSION
    name: str
    version: int
    task: str
    file: str = "model.onnx"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int
    precision: Literal["fp32", "int8"] = "fp32"  # int8: a quantized variant beside the fp32 file
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: Preprocessing = Preprocessing()
    labels: list[str] = []
    parameters: int = 0
    ood: OodCalibration | None = None
    metrics: dict[str, Any] = {}
    training: TrainingInfo | None = None
    extra: dict[str, Any] = {}

    @classmethod
    def read(cls, path: Path | str) -> Manifest:
        """Parse and validate a manifest file."""
        return cls.model_validate_json(Path(path).read_text())

    def write(self, path: Path | str) -> None:
        """Write the manifest as stable, human-readable JSON."""
        data = self.model_dump(mode="json")
        for spec in (*data["inputs"], *data["outputs"]):
            if spec.get("range") is None:
                spec.pop("range", None)  # only index-like inputs declare one
        text = json.dumps(data, indent=2, sort_keys=False)
        # Replaced in one step: a service polling the repository never reads half a manifest.
        path = Path(path)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text(text + "\n")
        partial.replace(path)
