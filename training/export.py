"""ONNX export, checks and the artifact contract (manifest + model card), shared by every model.

The steps every training script runs after training:

0. :class:`StagedVersion` gives the directory to write into, out of the repository's sight, and
   publishes it whole at the end.
1. :func:`export_onnx` writes one self-contained ``model.onnx`` (pinned opset, named inputs and
   outputs, dynamic batch axis, weights inside the file) and runs ``onnx.checker``.
2. :func:`check_parity` compares onnxruntime with PyTorch on given inputs.
3. :func:`write_model` builds the manifest's fields (version from the output directory, inputs and
   outputs read back from the graph) and writes ``manifest.json`` (with the file's sha256) and
   ``MODEL_CARD.md``.
"""

from __future__ import annotations

import logging
import os
import platform
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from pydantic import BaseModel

from services.core.manifest import (
    MANIFEST_FILE,
    ONNXRUNTIME_DTYPES,
    Manifest,
    OodCalibration,
    Preprocessing,
    TensorSpec,
    TrainingInfo,
    file_sha256,
)

log = logging.getLogger(__name__)

OPSET = 18
MODEL_FILE = "model.onnx"
CARD_FILE = "MODEL_CARD.md"


class StagedVersion:
    """A model version written out of sight and published whole, with one rename.

    Services poll the repository and read a version directory as soon as it appears, and a version
    without its manifest is an error there (``ModelRepository.versions`` is strict on purpose). A
    script that wrote in place left a broken repository for the minutes its evaluation takes. So
    the scripts write into ``<parent>/.staging-<pid>/<version>`` (the same file system; not a version
    number, so the repository ignores it) and :meth:`publish` renames it to ``out_dir`` once every
    file is written. The directory keeps the version's name, so the manifest's version (read from
    it) is the published one's. A run that fails leaves its files in the staging directory, for a
    look, and publishes nothing.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        if not self.out_dir.name.isdigit():
            log.warning("%s is not named by a version number: its manifest records version 1", self.out_dir)
        self.root = self.out_dir.parent / f".staging-{os.getpid()}"
        self.path = self.root / self.out_dir.name
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def publish(self) -> Path:
        """Move the staged version to ``out_dir`` (a version already there, a re-export, is replaced)."""
        if self.out_dir.exists():
            # Moved aside first: a directory cannot be renamed over a non-empty one.
            self.out_dir.rename(self.root / f"{self.out_dir.name}.replaced")
        self.path.rename(self.out_dir)
        shutil.rmtree(self.root)
        return self.out_dir


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    output_names: Sequence[str],
    path: Path,
    opset: int = OPSET,
) -> None:
    """Export ``model`` (called with ``example_inputs`` as positional arguments, in order).

    Input names are the keys of ``example_inputs``; axis 0 of every input is the dynamic batch.
    """
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    args = tuple(example_inputs.values())
    # Dynamo names dynamic shapes after the forward() parameters; a tuple keyed by position
    # works whatever the parameter names are.
    dynamic_shapes = tuple({0: batch} for _ in args)
    torch.onnx.export(
        model,
        args,
        str(path),
        input_names=list(example_inputs),
        output_names=list(output_names),
        opset_version=opset,
        dynamic_shapes=dynamic_shapes,
        external_data=False,
        dynamo=True,
        verbose=False,
    )
    onnx.checker.check_model(str(path), full_check=True)


def onnx_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU onnxruntime session for evaluation, with ``threads`` threads (0: as many as torch is given)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(
    session: ort.InferenceSession, inputs: Mapping[str, np.ndarray], batch_size: int = 1000
) -> list[np.ndarray]:
    """Run ``session`` over ``inputs`` in chunks of ``batch_size`` rows; outputs concatenated."""
    n = len(next(iter(inputs.values())))
    chunks: list[list[np.ndarray]] = []
    for start in range(0, n, batch_size):
        feed = {k: v[start : start + batch_size] for k, v in inputs.items()}
        chunks.append(session.run(None, feed))
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


@dataclass(frozen=True)
class Parity:
    """Result of a torch-vs-onnxruntime comparison."""

    max_abs_diff: float
    allclose: bool
    argmax_agreement: float | None
    rows: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "allclose_rtol1e-3_atol1e-5": self.allclose,
            "argmax_agreement": self.argmax_agreement,
            "rows": self.rows,
        }


def check_parity(
    model: torch.nn.Module,
    onnx_path: Path,
    inputs: Mapping[str, np.ndarray],
    rtol: float = 1e-3,
    atol: float = 1e-5,
    argmax: bool = False,
    batch_size: int = 1000,
) -> Parity:
    """Compare the first output of PyTorch and onnxruntime on ``inputs`` (numpy, batch-first)."""
    model.eval()
    session = onnx_session(onnx_path)
    ours = run_onnx(session, inputs, batch_size)[0]
    n = len(ours)
    with torch.no_grad():
        ref = np.concatenate(
            [
                model(*(torch.from_numpy(v[s : s + batch_size]) for v in inputs.values())).numpy()
                for s in range(0, n, batch_size)
            ]
        )
    agreement = None
    if argmax:
        agreement = float((ours.argmax(1) == ref.argmax(1)).mean())
    return Parity(
        max_abs_diff=float(np.abs(ours - ref).max()),
        allclose=bool(np.allclose(ours, ref, rtol=rtol, atol=atol)),
        argmax_agreement=agreement,
        rows=n,
    )


def tensor_specs(
    session: ort.InferenceSession, ranges: Mapping[str, tuple[int, int]] | None = None
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs read back from the exported graph (dynamic axes become -1).

    ``ranges`` gives the valid inclusive [low, high] of index-like integer inputs (labels,
    timesteps), which serving enforces before a request joins a batch.
    """
    ranges = ranges or {}

    def spec(arg: Any) -> TensorSpec:
        shape = [d if isinstance(d, int) else -1 for d in arg.shape]
        return TensorSpec(
            name=arg.name,
            dtype=ONNXRUNTIME_DTYPES[arg.type],
            shape=shape,
            range=ranges.get(arg.name),  # type: ignore[arg-type]
        )

    return [spec(a) for a in session.get_inputs()], [spec(a) for a in session.get_outputs()]


def command_line(argv: Sequence[str] | None, module: str | None = None) -> str:
    """The command that reproduces this run, as a user would type it.

    ``module`` names the ``training.<module>`` entry point; by default the running script's.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if module is None:
        module = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "train"
        if module in ("", "-c", "__main__"):
            module = "train"
    return shlex.join(["python", "-m", f"training.{module}", *args])


def training_info(
    argv: Sequence[str] | None,
    seed: int,
    data: str,
    epochs: int,
    duration_s: float,
    command: str | None = None,
    **extra: Any,
) -> TrainingInfo:
    """Provenance block of the manifest (``command``: the training run's, when this run only exports)."""
    return TrainingInfo(
        command=command or command_line(argv),
        seed=seed,
        data=data,
        epochs=epochs,
        duration_s=round(duration_s, 1),
        hardware=f"{platform.machine()} CPU, {torch.get_num_threads()} threads ({platform.processor() or 'unknown'})",
        torch_version=torch.__version__,
        **extra,
    )


def model_version(out_dir: Path) -> int:
    """The version a manifest records: its directory's name (1 for a directory not named by a number)."""
    return int(out_dir.name) if out_dir.name.isdigit() else 1


def manifest_fields(
    out_dir: Path,
    *,
    name: str,
    task: str,
    preprocessing: Preprocessing,
    parameters: int,
    metrics: dict[str, Any],
    training: TrainingInfo,
    labels: Sequence[str] = (),
    ood: OodCalibration | None = None,
    extra: Mapping[str, Any] | None = None,
    ranges: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Every field of the manifest but the checksum, for the graph already exported to ``out_dir``.

    The version comes from the directory's name, the opset is :data:`OPSET`, and inputs and
    outputs are read back from the graph (``ranges`` as for :func:`tensor_specs`).
    """
    inputs, outputs = tensor_specs(onnx_session(out_dir / MODEL_FILE), ranges)
    return {
        "name": name,
        "version": model_version(out_dir),
        "task": task,
        "opset": OPSET,
        "inputs": inputs,
        "outputs": outputs,
        "preprocessing": preprocessing,
        "labels": list(labels),
        "parameters": parameters,
        "ood": ood,
        "metrics": metrics,
        "training": training,
        "extra": dict(extra or {}),
    }


def card_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` with its pydantic values (training, ood, preprocessing) as plain dicts, for card templates."""
    return {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in fields.items()}


def write_model(out_dir: Path, card: Callable[[dict[str, Any]], str], **fields: Any) -> Manifest:
    """Build the manifest (:func:`manifest_fields`) and write it and the model card beside ``model.onnx``.

    ``card`` renders the model card from the fields as plain dicts (:func:`card_fields`);
    ``{sha256}`` in its text becomes the checksum.
    """
    built = manifest_fields(out_dir, **fields)
    return write_artifacts(out_dir, built, card(card_fields(built)))


def write_artifacts(out_dir: Path, fields: Mapping[str, Any], card: str) -> Manifest:
    """Write ``manifest.json`` from ``fields`` plus the ONNX file's sha256, and the model card.

    ``{sha256}`` in ``card`` is replaced by the checksum.
    """
    manifest = Manifest(**fields, sha256=file_sha256(out_dir / MODEL_FILE))
    manifest.write(out_dir / MANIFEST_FILE)
    (out_dir / CARD_FILE).write_text(card.replace("{sha256}", manifest.sha256))
    return manifest


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A small GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
