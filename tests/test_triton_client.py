"""Triton's own client (tritonclient[grpc], in its own venv since it needs protobuf<7) against nnserve."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.helpers import ROOT, ServiceProcess

TRITON_PYTHON = Path(os.environ.get("NNSERVE_TRITON_PYTHON", ROOT / ".venv-triton" / "bin" / "python"))


def test_tritonclient_conformance(classify_server: ServiceProcess, tiny_repository: Path, tmp_path: Path) -> None:
    if not TRITON_PYTHON.exists():
        if os.environ.get("NNSERVE_REQUIRE_TRITON"):
            pytest.fail(f"{TRITON_PYTHON} missing: run `make triton-venv`")
        pytest.skip("tritonclient venv missing (`make triton-venv`; `make test` creates it)")
    session = ort.InferenceSession(str(tiny_repository / "classifier" / "2" / "model.onnx"))
    rng = np.random.default_rng(0)
    reference = {}
    for batch in (1, 8):
        x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        reference[f"x{batch}"], reference[f"y{batch}"] = x, session.run(None, {"image": x})[0]
    np.savez(tmp_path / "reference.npz", **reference)
    script = ROOT / "tests" / "triton" / "triton_client_check.py"
    result = subprocess.run(
        [str(TRITON_PYTHON), str(script), classify_server.address, str(tmp_path / "reference.npz")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["infer_batch_1"] == summary["infer_batch_8"] == "match"
    assert "NOT_FOUND" in summary["unknown_model"]


def test_perf_analyzer_runs_unmodified(classify_server: ServiceProcess, tmp_path: Path) -> None:
    """Triton's load tool completes a short measurement and agrees with the server's statistics."""
    if not (TRITON_PYTHON.parent / "perf_analyzer").exists():
        if os.environ.get("NNSERVE_REQUIRE_TRITON"):
            pytest.fail("perf_analyzer missing: run `make triton-venv`")
        pytest.skip("perf_analyzer missing (`make triton-venv`)")
    csv = tmp_path / "pa.csv"
    result = subprocess.run(
        [
            str(ROOT / "benchmarks" / "perf_analyzer.sh"),
            classify_server.address,
            "--concurrency-range",
            "2",
            # A check, not a benchmark: accept any three windows, however noisy the machine is.
            "--stability-percentage",
            "100",
            "--measurement-interval",
            "1000",
            "-f",
            str(csv),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NNSERVE_TRITON_VENV": str(TRITON_PYTHON.parent.parent)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Server:" in result.stdout and "Inference count" in result.stdout
    header, row = csv.read_text().splitlines()[:2]
    fields = dict(zip(header.split(","), row.split(","), strict=False))
    assert float(fields["Inferences/Second"]) > 0


def _reference_inputs(model: str, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if model == "classifier":
        return {"image": rng.random((batch, 1, 28, 28), dtype=np.float32)}
    if model == "autoencoder":
        mask = (rng.random((batch, 1, 28, 28)) < 0.2).astype(np.float32)
        return {"image": rng.random((batch, 1, 28, 28), dtype=np.float32), "mask": mask}
    if model == "gan_generator":
        return {"z": rng.normal(size=(batch, 8)).astype(np.float32), "label": rng.integers(0, 10, batch)}
    return {
        "x_t": rng.normal(size=(batch, 1, 28, 28)).astype(np.float32),
        "t": rng.integers(0, 1000, batch),
        "label": rng.integers(0, 11, batch),
    }


@pytest.mark.parametrize(
    ("server", "model", "version"),
    [
        ("classify_server", "classifier", 2),
        ("restore_server", "autoencoder", 1),
        ("generate_server", "gan_generator", 1),
        ("generate_server", "diffusion_denoiser", 1),
    ],
)
def test_tritonclient_http_conformance(
    server: str, model: str, version: int, tiny_repository: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """tritonclient.http: health, metadata, config, statistics and inference at batch 1 and 8, JSON and
    binary, equal to in-process onnxruntime, against every service's HTTP port."""
    if not TRITON_PYTHON.exists():
        if os.environ.get("NNSERVE_REQUIRE_TRITON"):
            pytest.fail(f"{TRITON_PYTHON} missing: run `make triton-venv`")
        pytest.skip("tritonclient venv missing (`make triton-venv`; `make test` creates it)")
    service: ServiceProcess = request.getfixturevalue(server)
    session = ort.InferenceSession(str(tiny_repository / model / str(version) / "model.onnx"))
    rng = np.random.default_rng(0)
    reference: dict[str, np.ndarray] = {"model": np.array(model)}
    for batch in (1, 8):
        inputs = _reference_inputs(model, batch, rng)
        outputs = session.run(None, inputs)
        reference |= {f"in{batch}:{name}": value for name, value in inputs.items()}
        names = [o.name for o in session.get_outputs()]
        reference |= {f"out{batch}:{name}": value for name, value in zip(names, outputs, strict=True)}
    np.savez(tmp_path / "reference.npz", **reference)  # type: ignore[arg-type]
    script = ROOT / "tests" / "triton" / "triton_http_check.py"
    result = subprocess.run(
        [str(TRITON_PYTHON), str(script), f"127.0.0.1:{service.http_port}", str(tmp_path / "reference.npz")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for batch in (1, 8):
        assert summary[f"infer_batch_{batch}_json"] == summary[f"infer_batch_{batch}_binary"] == "match"
    assert "no_such_model" in summary["unknown_model"]


def test_perf_analyzer_http_runs_unmodified(classify_server: ServiceProcess, tmp_path: Path) -> None:
    """perf_analyzer -i http completes a short measurement against the classifier's HTTP port."""
    if not (TRITON_PYTHON.parent / "perf_analyzer").exists():
        if os.environ.get("NNSERVE_REQUIRE_TRITON"):
            pytest.fail("perf_analyzer missing: run `make triton-venv`")
        pytest.skip("perf_analyzer missing (`make triton-venv`)")
    csv = tmp_path / "pa.csv"
    result = subprocess.run(
        [
            str(ROOT / "benchmarks" / "perf_analyzer.sh"),
            f"127.0.0.1:{classify_server.http_port}",
            "-i",
            "http",
            "--concurrency-range",
            "2",
            "--stability-percentage",
            "100",
            "--measurement-interval",
            "1000",
            "-f",
            str(csv),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NNSERVE_TRITON_VENV": str(TRITON_PYTHON.parent.parent)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Server:" in result.stdout and "Inference count" in result.stdout
    header, row = csv.read_text().splitlines()[:2]
    fields = dict(zip(header.split(","), row.split(","), strict=False))
    assert float(fields["Inferences/Second"]) > 0
