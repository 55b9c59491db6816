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
