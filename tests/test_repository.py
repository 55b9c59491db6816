"""The model repository: version choice, checksums, names, and start-up errors that name the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.core.errors import ModelLoadError, ModelNotFound
from services.core.repository import ModelRepository
from services.core.runtime import OnnxModel, choose_providers
from tests.helpers import ROOT, make_tiny_classifier


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    make_tiny_classifier(tmp_path, version=1)
    make_tiny_classifier(tmp_path, version=3, seed=3)
    return tmp_path


def test_highest_version_unless_configured(repo: Path) -> None:
    repository = ModelRepository(repo)
    assert repository.models() == ["classifier"]
    assert repository.versions("classifier") == [1, 3]
    assert repository.resolve("classifier").version == 3
    assert repository.resolve("classifier", 1).version == 1


def test_missing_model_and_version(repo: Path) -> None:
    repository = ModelRepository(repo)
    with pytest.raises(ModelNotFound, match="'gan' not found"):
        repository.resolve("gan")
    with pytest.raises(ModelNotFound, match="no version 2"):
        repository.resolve("classifier", 2)


@pytest.mark.parametrize("name", ["../classifier", "..", "a/b", "/etc", "x" * 200, ""])
def test_names_cannot_escape_the_repository(repo: Path, name: str) -> None:
    with pytest.raises(ModelNotFound):
        ModelRepository(repo / "classifier").resolve(name)


def test_checksum_mismatch_is_a_load_error(repo: Path) -> None:
    onnx_path = repo / "classifier" / "3" / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    with pytest.raises(ModelLoadError, match=r"model\.onnx: sha256 .* does not match"):
        ModelRepository(repo).resolve("classifier")


def test_bad_manifests(repo: Path) -> None:
    manifest = repo / "classifier" / "3" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "version": 7}))
    with pytest.raises(ModelLoadError, match="manifest says classifier/7"):
        ModelRepository(repo).resolve("classifier")
    manifest.write_text("{not json")
    with pytest.raises(ModelLoadError, match="invalid manifest"):
        ModelRepository(repo).resolve("classifier")
    manifest.unlink()
    with pytest.raises(ModelLoadError, match="manifest missing"):
        ModelRepository(repo).resolve("classifier")


def test_onnx_file_that_onnxruntime_rejects(repo: Path) -> None:
    version_dir = repo / "classifier" / "3"
    (version_dir / "model.onnx").write_bytes(b"garbage")
    data = json.loads((version_dir / "manifest.json").read_text())
    import hashlib

    data["sha256"] = hashlib.sha256(b"garbage").hexdigest()
    (version_dir / "manifest.json").write_text(json.dumps(data))
    version = ModelRepository(repo).resolve("classifier")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load it"):
        OnnxModel(version)


def test_unavailable_provider_falls_back_to_cpu(caplog: pytest.LogCaptureFixture) -> None:
    assert choose_providers(["NoSuchExecutionProvider"]) == ["CPUExecutionProvider"]
    assert "not available" in caplog.text


@pytest.mark.parametrize("breakage", ["missing", "corrupt"])
def test_service_start_up_error_names_the_file(repo: Path, breakage: str) -> None:
    """A missing or corrupt model ends the process with exit 2 and one line naming the file."""
    root = repo
    if breakage == "missing":
        root = repo / "empty"
        root.mkdir()
        needle = "'classifier' not found"
    else:
        onnx_path = repo / "classifier" / "3" / "model.onnx"
        onnx_path.write_bytes(b"corrupt")
        needle = str(onnx_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.classify",
            "--port",
            "0",
            "--metrics-port",
            "none",
            "--model-repository",
            str(root),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_predict_on_the_cpu_provider_matches_onnxruntimes_python_run(repo: Path) -> None:
    """predict calls the C++ session's run directly on the CPU provider: the same outputs as the
    Python wrapper's run, and a feed without the model's input is still refused."""
    model = OnnxModel(ModelRepository(repo).resolve("classifier"))
    assert model._run != model.session.run  # the direct call is the one in use
    inputs = {"image": np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)}
    expected = model.session.run(model.output_names, inputs)
    outputs = model.predict(inputs)
    assert list(outputs) == model.output_names
    for name, array in zip(model.output_names, expected, strict=True):
        np.testing.assert_array_equal(outputs[name], array)
    with pytest.raises(Exception, match="image"):
        model.predict({})
