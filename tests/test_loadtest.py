"""nnserve loadtest against a real service, with small counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.loadtest import Histogram
from services.loadtest import main as loadtest
from tests.helpers import ServiceProcess, metric_value


def test_histogram_quantiles_within_one_percent() -> None:
    h = Histogram()
    for ms in range(1, 1001):
        h.record(ms / 1000)
    assert h.total == 1000 and h.max == 1.0
    assert h.quantile(0.5) == pytest.approx(0.5, rel=0.01)
    assert h.quantile(0.99) == pytest.approx(0.99, rel=0.01)


@pytest.mark.parametrize("mode", [["-c", "4"], ["--rate", "200", "--arrivals", "constant"]], ids=["closed", "open"])
def test_loadtest_reports_what_the_server_counted(
    classify_server: ServiceProcess, tmp_path: Path, mode: list[str], capsys
) -> None:  # type: ignore[no-untyped-def]
    before = metric_value(classify_server.metrics_text(), "nnserve_grpc_requests_total", grpc_code="OK")
    out = tmp_path / "report.json"
    args = [
        classify_server.address,
        *mode,
        "-n",
        "2",
        "--duration",
        "1.5",
        "--warmup",
        "0.3",
        "--json",
        str(out),
        "--quiet",
    ]
    assert loadtest(args) == 0
    report = json.loads(out.read_text())
    assert report["ok"] > 20 and report["errors"] == {}
    assert report["images_per_s"] == pytest.approx(2 * report["requests_per_s"], rel=0.01)
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    served = metric_value(classify_server.metrics_text(), "nnserve_grpc_requests_total", grpc_code="OK") - before
    assert served >= report["ok"]  # warm-up calls are served but not reported
    assert "requests/s" in capsys.readouterr().out


def test_loadtest_counts_errors_by_code(classify_server: ServiceProcess, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "report.json"
    args = [
        classify_server.address,
        "-c",
        "2",
        "--payload",
        "files",
        "--files",
        str(bad),
        "--requests",
        "10",
        "--duration",
        "5",
        "--warmup",
        "0",
        "--json",
        str(out),
        "--quiet",
    ]
    assert loadtest(args) == 1
    report = json.loads(out.read_text())
    assert report["ok"] == 0 and report["errors"].get("INVALID_ARGUMENT", 0) >= 10


@pytest.mark.parametrize(
    "server, args",
    [
        ("restore_server", ["--rpc", "restore", "-n", "4"]),
        ("generate_server", ["--rpc", "generate", "--model", "gan", "-n", "2"]),
        ("generate_server", ["--rpc", "generate-stream", "--model", "diffusion", "--steps", "3"]),
        ("classify_server", ["--rpc", "infer", "--model-name", "classifier", "-n", "3"]),
        ("generate_server", ["--rpc", "infer", "--model-name", "diffusion_denoiser", "-n", "2"]),
    ],
    ids=["restore", "gan", "diffusion-stream", "infer-classifier", "infer-denoiser"],
)
def test_loadtest_targets_every_rpc(
    request: pytest.FixtureRequest, server: str, args: list[str], tmp_path: Path
) -> None:
    target: ServiceProcess = request.getfixturevalue(server)
    out = tmp_path / "report.json"
    common = ["-c", "2", "--duration", "1", "--warmup", "0.2", "--json", str(out), "--quiet"]
    assert loadtest([target.address, *args, *common]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] >= 2 and report["errors"] == {} and report["config"]["rpc"] == args[1]
