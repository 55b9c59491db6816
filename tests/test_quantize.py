"""INT8 variants: the quantize script, the repository's precision resolution, and services serving them.

The script runs here in --dry-run mode (fake calibration and test data) on copies of the shipped
fp32 models; the shipped variants' quality bars live in tests/test_shipped_models.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from services.classify.settings import ClassifySettings
from services.client import ClassifyClient, RestoreClient
from services.core.errors import ModelLoadError, ModelNotFound
from services.core.manifest import Manifest
from services.core.repository import ModelRepository, manifest_file
from tests.helpers import ROOT, metric_value, start_service
from training import quantize
from training.data import file_sha256


@pytest.fixture(scope="module")
def int8_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with copies of the shipped fp32 classifier and autoencoder plus dry-run int8 variants."""
    root = tmp_path_factory.mktemp("int8-repo")
    for name in ("classifier", "autoencoder"):
        directory = root / name / "1"
        shutil.copytree(ROOT / "models" / name / "1", directory)
        for stale in directory.glob("*int8*"):
            stale.unlink()
        assert quantize.main([name, "--dry-run", "--model-dir", str(directory)]) == 0
    return root


@pytest.mark.parametrize("name", ["classifier", "autoencoder"])
def test_dry_run_writes_a_verified_variant_beside_the_fp32_files(int8_repository: Path, name: str) -> None:
    directory = int8_repository / name / "1"
    fp32 = Manifest.read(directory / "manifest.json")
    shipped = Manifest.read(ROOT / "models" / name / "1" / "manifest.json")
    assert fp32 == shipped and file_sha256(directory / "model.onnx") == shipped.sha256  # fp32 untouched
    variant = ModelRepository(int8_repository).resolve(name, precision="int8")
    manifest = variant.manifest
    assert variant.onnx_path == directory / "model.int8.onnx" and manifest.precision == "int8"
    assert manifest.sha256 == file_sha256(variant.onnx_path) != fp32.sha256
    assert manifest.inputs == fp32.inputs and manifest.outputs == fp32.outputs
    assert manifest.training is not None and manifest.training.command.startswith("python -m training.quantize")
    assert manifest.extra["quantization"]["format"] == "QDQ" and manifest.extra["quantization"]["per_channel"]
    assert set(manifest.metrics["speed_1thread"]) == {"1", "64"}
    assert manifest.metrics["parity_vs_fp32"]["rows"] > 0
    card = (directory / "MODEL_CARD.md").read_text()
    assert manifest.sha256 in card and fp32.sha256 in card and card.count(quantize.CARD_HEADING) == 1
    ops = {node.op_type for node in onnx.load(str(variant.onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_quantization_is_reproducible(int8_repository: Path, tmp_path: Path) -> None:
    """Same seed and data: the same bytes; the card keeps one INT8 section however often it runs."""
    directory = tmp_path / "classifier" / "1"
    shutil.copytree(int8_repository / "classifier" / "1", directory)
    assert quantize.main(["classifier", "--dry-run", "--model-dir", str(directory)]) == 0
    before = int8_repository / "classifier" / "1" / "model.int8.onnx"
    assert file_sha256(directory / "model.int8.onnx") == file_sha256(before)
    assert (directory / "MODEL_CARD.md").read_text().count(quantize.CARD_HEADING) == 1
    # Written under hidden names and moved into place: nothing partial is left beside the variant.
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        p.name for p in (int8_repository / "classifier" / "1").iterdir()
    )
    assert not list(directory.glob(".*"))


def test_repository_precision_errors(int8_repository: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(int8_repository / "classifier", repo / "classifier")
    repository = ModelRepository(repo)
    assert repository.precisions("classifier", 1) == ["fp32", "int8"]
    assert repository.resolve("classifier").manifest.precision == "fp32"
    with pytest.raises(ModelNotFound, match="no int4 variant"):
        repository.resolve("classifier", precision="int4")
    with pytest.raises(ModelNotFound, match="precision"):
        repository.resolve("classifier", precision="../x")
    (repo / "classifier" / "1" / "model.int8.onnx").write_bytes(b"corrupt")
    with pytest.raises(ModelLoadError, match="model.int8.onnx: sha256"):
        repository.resolve("classifier", precision="int8")
    # A variant manifest that claims another precision is refused, naming the file.
    manifest = Manifest.read(repo / "classifier" / "1" / "manifest.json")
    manifest.write(repo / "classifier" / "1" / manifest_file("int8"))
    with pytest.raises(ModelLoadError, match="manifest.int8.json: manifest says precision fp32"):
        repository.resolve("classifier", precision="int8")


def test_precision_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ClassifySettings().precision == "fp32"
    monkeypatch.setenv("NNSERVE_CLASSIFY_PRECISION", "int8")
    assert ClassifySettings().precision == "int8"


def test_classify_serves_the_int8_variant(int8_repository: Path, tmp_path: Path) -> None:
    """``--precision int8`` loads model.int8.onnx: answers equal in-process int8 onnxruntime; log, metric say so."""
    server = start_service("services.classify", int8_repository, tmp_path, "--precision", "int8")
    try:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
        with ClassifyClient(server.address) as client:
            reply = client.classify(tensor=pixels, top_k=10)
        session = ort.InferenceSession(str(int8_repository / "classifier" / "1" / "model.int8.onnx"))
        logits = session.run(None, {"image": pixels.astype(np.float32)[:, None] / 255.0})[0]
        expected = np.exp(logits - logits.max(1, keepdims=True))
        expected /= expected.sum(1, keepdims=True)
        for c, probs in zip(reply.classifications, expected, strict=True):
            got = {p.class_id: p.probability for p in c.predictions}
            np.testing.assert_allclose([got[k] for k in range(10)], probs, rtol=1e-4, atol=1e-5)
        text = server.metrics_text()
        assert metric_value(text, "nnserve_model_info", model="classifier", version="1", precision="int8") == 1
        assert metric_value(text, "nnserve_model_info", precision="fp32") == 0
    finally:
        assert server.stop() == 0
    assert "classifier/1 in int8" in server.log()


def test_restore_serves_the_int8_variant_and_fp32_by_default(int8_repository: Path, tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(3, 28, 28)).astype(np.uint8)
    outputs = {}
    for precision in ("fp32", "int8"):
        server = start_service("services.restore", int8_repository, tmp_path, "--precision", precision)
        try:
            with RestoreClient(server.address) as client:
                outputs[precision] = client.restore(tensor=pixels, as_tensor=True)
            assert metric_value(server.metrics_text(), "nnserve_model_info", precision=precision) == 1
        finally:
            server.stop()
    a, b = (np.frombuffer(outputs[p].tensor.data, dtype="<f4") for p in ("fp32", "int8"))
    assert a.shape == b.shape and not np.array_equal(a, b)  # a different file answered
    assert np.abs(a - b).max() < 0.25  # ...and it is the same model, quantized


def test_a_missing_variant_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = tmp_path / "repo"
    fp32_only = shutil.ignore_patterns("*int8*")
    shutil.copytree(ROOT / "models" / "classifier" / "1", repo / "classifier" / "1", ignore=fp32_only)
    result = subprocess.run(
        [sys.executable, "-m", "services.classify", "--model-repository", str(repo), "--precision", "int8",
         "--port", "0", "--metrics-port", "none"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "no int8 variant" in result.stderr and "manifest.int8.json" in result.stderr
