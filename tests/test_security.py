"""TLS, mutual TLS and bearer-token auth on a real service process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import ClassifyClient, secure_channel
from tests.helpers import ROOT, start_service

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=nnserve-test-ca",
    )
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        extra = ["-extfile", "server.ext"] if name == "server" else []
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            *extra,
        )
    (d / "token").write_text(TOKEN + "\n")
    return d


def classify(channel: grpc.Channel) -> int:
    reply = ClassifyClient("", channel=channel).classify(tensor=np.zeros((2, 28, 28), np.uint8), timeout=10)
    return len(reply.classifications)


def test_tls_with_bearer_token(pki: Path, tiny_repository: Path, tmp_path: Path) -> None:
    server = start_service(
        "services.classify",
        tiny_repository,
        tmp_path,
        "--tls-cert-file",
        str(pki / "server.pem"),
        "--tls-key-file",
        str(pki / "server.key"),
        "--auth-token-file",
        str(pki / "token"),
    )
    try:
        ca = str(pki / "ca.pem")
        assert classify(secure_channel(server.address, ca, TOKEN)) == 2
        for channel in (secure_channel(server.address, ca), secure_channel(server.address, ca, "wrong-token")):
            with pytest.raises(grpc.RpcError) as caught:
                classify(channel)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert caught.value.details() == "missing or invalid bearer token"  # says nothing more
        # Health stays open for probes by default.
        reply = health_pb2_grpc.HealthStub(secure_channel(server.address, ca)).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Plaintext clients cannot talk to a TLS server.
        with pytest.raises(grpc.RpcError) as caught:
            classify(grpc.insecure_channel(server.address))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "UNAUTHENTICATED" in server.metrics_text()
    finally:
        assert server.stop() == 0


def test_health_can_require_the_token_too(pki: Path, tiny_repository: Path, tmp_path: Path) -> None:
    server = start_service(
        "services.classify",
        tiny_repository,
        tmp_path,
        "--auth-token-file",
        str(pki / "token"),
        "--auth-exempt-health",
        "false",
        "--tls-cert-file",
        str(pki / "server.pem"),
        "--tls-key-file",
        str(pki / "server.key"),
    )
    try:
        with pytest.raises(grpc.RpcError) as caught:
            health_pb2_grpc.HealthStub(secure_channel(server.address, str(pki / "ca.pem"))).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()


def test_mutual_tls(pki: Path, tiny_repository: Path, tmp_path: Path) -> None:
    server = start_service(
        "services.classify",
        tiny_repository,
        tmp_path,
        "--tls-cert-file",
        str(pki / "server.pem"),
        "--tls-key-file",
        str(pki / "server.key"),
        "--tls-client-ca-file",
        str(pki / "ca.pem"),
    )
    try:
        ca = str(pki / "ca.pem")
        assert (
            classify(
                secure_channel(
                    server.address,
                    ca,
                    client_cert_file=str(pki / "client.pem"),
                    client_key_file=str(pki / "client.key"),
                )
            )
            == 2
        )
        with pytest.raises(grpc.RpcError) as caught:
            classify(secure_channel(server.address, ca))  # no client certificate
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--tls-cert-file", "/nonexistent.pem"], "TLS needs both"),
        (["--tls-cert-file", "/nonexistent.pem", "--tls-key-file", "/nonexistent.key"], "cannot read TLS file"),
        (["--auth-token-file", "/nonexistent-token"], "auth token"),
    ],
)
def test_bad_security_settings_stop_start_up(tiny_repository: Path, args: list[str], needle: str) -> None:
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
            str(tiny_repository),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr
