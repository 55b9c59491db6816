"""The model repository: ``<root>/<name>/<version>/{model.onnx, manifest.json}``.

Versions are positive integers; the highest is served unless one is configured. A version is
usable only when its manifest parses, names the model and version of its directory, and the ONNX
file's sha256 matches the manifest. (So a directory copied by hand under a new number is refused:
replies and metrics never name a version the files do not claim. ``nnserve promote`` makes the copy
with the manifests rewritten.)

A version may ship precision variants beside its fp32 files: ``manifest.int8.json`` describes
``model.int8.onnx`` (a quantized copy of the same model, with its own checksum and parity
figures). A variant is not a version of its own, so the version numbering, hot reload and
``model_version`` pinning work the same for every precision; the ``precision`` setting picks
which manifest of the chosen version is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from services.core.errors import ModelLoadError, ModelNotFound
from services.core.manifest import MANIFEST_FILE, Manifest, file_sha256

DEFAULT_PRECISION = "fp32"

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_PRECISION = re.compile(r"^[a-z0-9]{1,16}$")


def manifest_file(precision: str = DEFAULT_PRECISION) -> str:
    """The manifest's file name for ``precision``: ``manifest.json`` for fp32, ``manifest.<precision>.json`` else."""
    if precision == DEFAULT_PRECISION:
        return MANIFEST_FILE
    if not _PRECISION.match(precision):
        raise ModelNotFound(f"precision {precision!r} is not valid (lowercase letters and digits)")
    return f"manifest.{precision}.json"


@dataclass(frozen=True)
class ModelVersion:
    """One verified model version on disk."""

    name: str
    version: int
    directory: Path
    manifest: Manifest

    @property
    def onnx_path(self) -> Path:
        return self.directory / self.manifest.file

    @property
    def precision(self) -> str:
        return self.manifest.precision


class ModelRepository:
    """Finds and verifies model versions under ``root``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def _model_dir(self, name: str) -> Path:
        # The name pattern forbids path separators and "..", so a name cannot leave the root.
        if not _NAME.match(name) or name in (".", ".."):
            raise ModelNotFound(f"model name {name!r} is not valid (letters, digits, '_', '-', '.')")
        return self.root / name

    def versions(self, name: str) -> list[int]:
        """Version numbers present for ``name``, ascending (unverified)."""
        directory = self._model_dir(name)
        if not directory.is_dir():
            return []
        return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)

    def models(self) -> list[str]:
        """Names of the models that have at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name) and self.versions(p.name)
        )

    def precisions(self, name: str, version: int) -> list[str]:
        """Precisions whose manifest is present in ``name``/``version`` (unverified), fp32 first."""
        directory = self._model_dir(name) / str(version)
        found = [DEFAULT_PRECISION] if (directory / MANIFEST_FILE).is_file() else []
        for path in sorted(directory.glob("manifest.*.json")):
            precision = path.name[len("manifest.") : -len(".json")]
            if _PRECISION.match(precision) and precision != DEFAULT_PRECISION:
                found.append(precision)
        return found

    def resolve(self, name: str, version: int | None = None, precision: str = DEFAULT_PRECISION) -> ModelVersion:
        """Load and verify ``name`` at ``version`` (default: the highest present) in ``precision``.

        Raises ModelNotFound when the model, version or precision variant is absent and
        ModelLoadError when it is present but unusable; both messages name the file at fault.
        """
        available = self.versions(name)
        if not available:
            raise ModelNotFound(f"model {name!r} not found in repository {self.root}")
        chosen = available[-1] if version is None else version
        if chosen not in available:
            raise ModelNotFound(f"model {name!r} has no version {chosen} in {self.root} (versions: {available})")
        directory = self._model_dir(name) / str(chosen)
        manifest_path = directory / manifest_file(precision)
        try:
            manifest = Manifest.read(manifest_path)
        except FileNotFoundError:
            if precision != DEFAULT_PRECISION and (directory / MANIFEST_FILE).is_file():
                raise ModelNotFound(
                    f"model {name!r} version {chosen} has no {precision} variant ({manifest_path} missing; "
                    f"precisions: {self.precisions(name, chosen)})"
                ) from None
            raise ModelLoadError(f"{manifest_path}: manifest missing") from None
        except (ValidationError, ValueError) as exc:
            raise ModelLoadError(f"{manifest_path}: invalid manifest: {exc}") from None
        if manifest.name != name or manifest.version != chosen:
            hint = f" (a hand copy? remove it and run: nnserve promote {name} {manifest.version} {chosen})"
            raise ModelLoadError(
                f"{manifest_path}: manifest says {manifest.name}/{manifest.version}, directory is {name}/{chosen}"
                + (hint if manifest.name == name else "")
            )
        if manifest.precision != precision:
            raise ModelLoadError(f"{manifest_path}: manifest says precision {manifest.precision}, expected {precision}")
        onnx_path = directory / manifest.file
        if onnx_path.parent != directory:
            raise ModelLoadError(f"{manifest_path}: file {manifest.file!r} must be inside the version directory")
        if not onnx_path.is_file():
            raise ModelLoadError(f"{onnx_path}: model file missing")
        actual = file_sha256(onnx_path)
        if actual != manifest.sha256:
            raise ModelLoadError(f"{onnx_path}: sha256 {actual} does not match manifest {manifest.sha256}")
        return ModelVersion(name=name, version=chosen, directory=directory, manifest=manifest)
