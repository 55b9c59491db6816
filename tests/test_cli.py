"""The nnserve command against a real service."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.cli import main
from tests.helpers import ROOT, ServiceProcess


def test_health_command(classify_server: ServiceProcess, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["health", classify_server.address]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert main(["health", classify_server.address, "--service", "nnserve.v1.ClassifyService"]) == 0
    assert main(["health", "127.0.0.1:1", "--timeout", "1"]) == 1


def test_classify_command_prints_labels(classify_server: ServiceProcess, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "item.png"
    pixels = np.zeros((28, 28), np.uint8)
    pixels[5:23, 8:20] = 200
    Image.fromarray(pixels, mode="L").save(path)
    assert main(["classify", str(path), "--address", classify_server.address, "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: ") and "%" in out and "ood score" in out
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    assert main(["classify", str(bad), "--address", classify_server.address]) == 1
    assert "INVALID_ARGUMENT: images[0]" in capsys.readouterr().err


def test_serve_help_lists_settings_with_their_environment_names() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "classify", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "--max-batch-size" in result.stdout and "NNSERVE_CLASSIFY_MAX_BATCH_SIZE" in result.stdout


def test_settings_come_from_flags_then_environment(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import argparse

    from services.classify.settings import ClassifySettings
    from services.core.settings import add_settings_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, ClassifySettings)
    monkeypatch.setenv("NNSERVE_CLASSIFY_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("NNSERVE_CLASSIFY_PORT", "6000")
    settings = settings_from_args(
        ClassifySettings,
        parser.parse_args(
            ["--port", "7000", "--providers", "CUDAExecutionProvider,CPUExecutionProvider", "--metrics-port", "none"]
        ),
    )
    assert settings.port == 7000 and settings.max_batch_size == 32
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert settings.metrics_port is None
    assert settings.threads >= 1


def _free_offset() -> int:
    """A port offset for `nnserve up` whose gRPC and metrics ports are both free now."""
    import random
    import socket

    for _ in range(100):
        offset = random.randint(-9000, 10000)
        try:
            from services.cli import SERVICES

            wanted = [(spec.port, spec.metrics_port, spec.http_port) for spec in SERVICES.values()]
            for port in [p + offset for ports in wanted for p in ports if p is not None]:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except (OSError, OverflowError):
            continue
        return offset
    raise RuntimeError("no free ports")


def test_up_starts_the_suite_and_stops_on_sigterm(tiny_repository: Path) -> None:
    """`nnserve up` (the README's start command) prints where services listen; SIGTERM stops all."""
    import signal
    import time

    offset = _free_offset()
    address = f"127.0.0.1:{50051 + offset}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--model-repository",
            str(tiny_repository),
            "--port-offset",
            str(offset),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "stop: Ctrl-C" in line or not line:
            break
    text = "".join(lines)
    try:
        assert f"grpc {address}" in text and f"http://127.0.0.1:{9101 + offset}/metrics" in text, text
        assert main(["health", address]) == 0
        http = f"http://127.0.0.1:{8001 + offset}"
        assert f"try: curl -F image=@shirt.png {http}/v1/classify" in text, text
        with urllib.request.urlopen(f"{http}/v2/health/ready", timeout=10) as reply:
            assert json.loads(reply.read()) == {"ready": True}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, text


def test_list_settings_from_the_environment_take_commas_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's NNSERVE_CLASSIFY_PROVIDERS=A,B failed with a SettingsError (JSON was required)."""
    from services.classify.settings import ClassifySettings

    monkeypatch.setenv("NNSERVE_CLASSIFY_PROVIDERS", "CUDAExecutionProvider, CPUExecutionProvider")
    assert ClassifySettings().providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setenv("NNSERVE_CLASSIFY_PROVIDERS", '["CPUExecutionProvider"]')
    assert ClassifySettings().providers == ["CPUExecutionProvider"]
