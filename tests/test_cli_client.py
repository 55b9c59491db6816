"""The nnserve client commands and nnserve loadtest without rough edges: help with defaults, one
line and exit 2 for local problems, TLS and tokens, the wrong service named, JSON field names,
progress only on a terminal, --scale. Every call goes to a real service process."""

from __future__ import annotations

import argparse
import io
import json
import os
import pty
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.cli import build_parser, main
from services.loadtest import build_parser as loadtest_parser
from tests.helpers import ROOT, ServiceProcess, start_service
from tests.test_security import TOKEN, pki  # noqa: F401 (the fixture: a CA, server and client certificates)

pytestmark = pytest.mark.timeout(300)


def nnserve(*args: str, stderr: int | None = subprocess.PIPE, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run the nnserve command as a user does, in its own process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNSERVE_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=120,
        env=env,
    )


def a_png(path: Path) -> Path:
    pixels = np.zeros((28, 28), np.uint8)
    pixels[5:23, 8:20] = 200
    Image.fromarray(pixels, mode="L").save(path)
    return path


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {name: p for name, p in sub.choices.items() if name not in ("serve", "loadtest")}
    parsers["loadtest"] = loadtest_parser()
    return parsers


def test_every_option_of_every_client_command_says_its_default() -> None:
    parsers = subcommand_parsers()
    assert {"classify", "restore", "generate", "health", "up", "loadtest"} <= set(parsers)
    for name, parser in parsers.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = formatter._expand_help(action) if action.help else ""  # what --help prints
            assert text, f"nnserve {name} {action.option_strings[0]} has no help"
            assert "default" in text, f"nnserve {name} {action.option_strings[0]}: {text!r} does not give the default"
    help_text = nnserve("generate", "--help").stdout
    assert "(default: gan)" in help_text and "--tls-ca-file" in help_text and "exit status" in help_text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["classify", "missing.png"], "nnserve classify: error: cannot read image missing.png: No such file"),
        (["classify", "."], "nnserve classify: error: cannot read image .: Is a directory"),
        (["restore", "a.png", "--masks", "m1.png", "m2.png"], "--masks: 2 masks for 1 images"),
        (["generate", "--steps", "0", "--model", "diffusion"], "argument --steps: 0 is out of range (>= 1)"),
        (["generate", "--count", "0"], "argument --count: 0 is out of range"),
        (["generate", "--eta", "2", "--model", "diffusion"], "argument --eta: 2 is out of range (0.0..1.0)"),
        (["generate", "--steps", "20"], "--steps: only for --model diffusion"),
        (["classify", "x.png", "--top-k", "11"], "argument --top-k: 11 is out of range (1..10)"),
        (["classify", "x.png", "--timeout", "0"], "argument --timeout: 0 is out of range"),
        (["health", "--tls-ca-file", "no-such-ca.pem"], "nnserve health: error: cannot read CA file no-such-ca.pem"),
        (["health", "--tls-client-cert-file", "c.pem"], "--tls-client-cert-file and --tls-client-key-file go together"),
        (["loadtest", "127.0.0.1:1", "--payload", "files", "--files", "gone.png"], "gone.png: No such file"),
        (["loadtest", "127.0.0.1:1", "--token-file", "gone-token"], "cannot read token file gone-token"),
        (["loadtest", "127.0.0.1:1", "--concurrency", "0"], "argument --concurrency/-c: 0 is out of range"),
    ],
)
def test_local_problems_are_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    a_png(tmp_path / "a.png")
    a_png(tmp_path / "m1.png")
    result = nnserve(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1], result.stderr


def test_serve_on_a_busy_port_is_one_line_and_exit_2(tiny_repository: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags in (
            ["--port", str(port), "--metrics-port", "none", "--http-port", "none"],
            ["--port", "0", "--metrics-port", str(port), "--http-port", "none"],
            # After gRPC has started: its server is closed on the loop, not by a finalizer that
            # finds the loop gone ("Exception ignored ... Event loop is closed").
            ["--port", "0", "--metrics-port", "none", "--http-port", str(port)],
        ):
            result = nnserve(
                "serve", "classify", "--model-repository", str(tiny_repository), "--workers", "1", *flags
            )  # fmt: skip
            assert result.returncode == 2, result.stderr
            assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
            last = result.stderr.strip().splitlines()[-1]
            assert last.startswith("nnserve serve classify: error: cannot listen"), last
            assert str(port) in last


def test_calling_the_wrong_service_names_the_one_there(generate_server: ServiceProcess, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    image = a_png(tmp_path / "item.png")
    assert main(["classify", str(image), "--address", generate_server.address]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"nnserve classify: {generate_server.address} serves nnserve.v1.GenerateService, not "
        "nnserve.v1.ClassifyService: is --address the classify service's port?"
    )
    assert main(["restore", str(image), "--address", generate_server.address]) == 1
    assert "serves nnserve.v1.GenerateService, not nnserve.v1.RestoreService" in capsys.readouterr().err


def test_nothing_listening_is_one_line_and_exit_1(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert main(["classify", str(a_png(tmp_path / "a.png")), "--address", f"127.0.0.1:{free}", "--timeout", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nnserve classify: UNAVAILABLE") and "is a service listening at" in err
    assert len(err.splitlines()) == 1


def test_json_uses_the_proto_field_names(classify_server: ServiceProcess, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    image = a_png(tmp_path / "item.png")
    assert main(["classify", str(image), "--address", classify_server.address, "--json", "--top-k", "2"]) == 0
    reply = json.loads(capsys.readouterr().out)
    first = reply["classifications"][0]
    assert {"predictions", "ood_score"} <= set(first) and "oodScore" not in first
    assert len(first["predictions"]) == 2 and {"label", "probability", "class_id"} <= set(first["predictions"][0])
    assert {"model_name", "model_version"} <= set(reply)


def test_progress_bar_draws_only_on_a_terminal(generate_server: ServiceProcess, tmp_path: Path) -> None:
    args = ("generate", "--model", "diffusion", "--steps", "4", "--count", "2", "--seed", "1",
            "--address", generate_server.address)  # fmt: skip
    piped = nnserve(*args, "--out", str(tmp_path / "piped.png"))
    assert piped.returncode == 0, piped.stderr
    assert "sampling" not in piped.stderr and piped.stdout.startswith("2 images from diffusion_denoiser/1")
    leader, follower = pty.openpty()
    try:
        on_tty = nnserve(*args, "--out", str(tmp_path / "tty.png"), stderr=follower)
        os.close(follower)
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal's other end is closed: everything is read
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(leader)
    assert on_tty.returncode == 0
    assert b"sampling [" in drawn and b"step 4/4" in drawn


def test_scale_enlarges_the_grid_without_blurring(generate_server: ServiceProcess, tmp_path: Path) -> None:
    common = ["generate", "--count", "4", "--seed", "3", "--label", "1", "--address", generate_server.address]
    assert main([*common, "--out", str(tmp_path / "small.png")]) == 0
    assert main([*common, "--out", str(tmp_path / "big.png"), "--scale", "3"]) == 0
    small = np.asarray(Image.open(tmp_path / "small.png"))
    big = np.asarray(Image.open(tmp_path / "big.png"))
    assert big.shape[:2] == (small.shape[0] * 3, small.shape[1] * 3)
    assert np.array_equal(big[::3, ::3], small) and np.array_equal(big[2::3, 2::3], small)
    # One PNG per image, each scaled too.
    assert main([*common, "--out", str(tmp_path / "each"), "--scale", "2"]) == 0
    sizes = {Image.open(p).size for p in (tmp_path / "each").glob("*.png")}
    assert len(list((tmp_path / "each").glob("*.png"))) == 4 and sizes == {(56, 56)}


@pytest.fixture(scope="module")
def secure_classify(
    pki: Path,  # noqa: F811 (the fixture imported above)
    tiny_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    """classify with TLS, mutual TLS and a bearer token."""
    server = start_service(
        "services.classify", tiny_repository, tmp_path_factory.mktemp("secure"),
        "--tls-cert-file", str(pki / "server.pem"), "--tls-key-file", str(pki / "server.key"),
        "--tls-client-ca-file", str(pki / "ca.pem"), "--auth-token-file", str(pki / "token"),
    )  # fmt: skip
    yield server
    server.stop()


def test_client_commands_and_loadtest_speak_tls_and_tokens(
    secure_classify: ServiceProcess,
    pki: Path,  # noqa: F811
    tmp_path: Path,
    capsys,  # type: ignore[no-untyped-def]
) -> None:
    image = str(a_png(tmp_path / "item.png"))
    tls = ["--tls-ca-file", str(pki / "ca.pem")]
    mtls = [*tls, "--tls-client-cert-file", str(pki / "client.pem"), "--tls-client-key-file", str(pki / "client.key")]
    address = ["--address", secure_classify.address]
    assert main(["classify", image, *address, *mtls, "--token-file", str(pki / "token")]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")
    assert main(["classify", image, *address, *mtls, "--token", TOKEN, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["classifications"]
    # The server checks each: no token, no client certificate, no TLS.
    assert main(["classify", image, *address, *mtls]) == 1
    assert "UNAUTHENTICATED: missing or invalid bearer token" in capsys.readouterr().err
    assert main(["classify", image, *address, *tls, "--token", TOKEN, "--timeout", "5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert main(["classify", image, *address, "--token", TOKEN, "--timeout", "5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert main(["health", secure_classify.address, *mtls]) == 0  # health is exempt from the token
    assert capsys.readouterr().out.strip() == "SERVING"
    report = tmp_path / "load.json"
    load = ["loadtest", secure_classify.address, "--requests", "20", "-c", "2", "--warmup", "0", "--quiet"]
    assert main([*load, *mtls, "--token-file", str(pki / "token"), "--json", str(report)]) == 0
    assert json.loads(report.read_text())["ok"] == 20
    assert main([*load, *mtls, "--duration", "2"]) == 1  # every call refused: no token
    assert json.loads(report.read_text())["ok"] == 20  # (--json was not given, the report stays)


def test_a_token_without_tls_reaches_a_plaintext_service(
    tiny_repository: Path,
    pki: Path,  # noqa: F811
    tmp_path: Path,
    capsys,  # type: ignore[no-untyped-def]
) -> None:
    """A service behind a mesh may check tokens without TLS: the CLI sends the header itself,
    on unary calls, on the diffusion stream and from loadtest's asyncio channels."""
    server = start_service(
        "services.generate", tiny_repository, tmp_path / "generate", "--auth-token-file", str(pki / "token"),
        "--max-count", "4",
    )  # fmt: skip
    try:
        common = ["generate", "--count", "2", "--address", server.address, "--seed", "1"]
        assert main([*common, "--out", str(tmp_path / "gan.png"), "--token", TOKEN]) == 0
        assert main([*common, "--model", "diffusion", "--steps", "2", "--out", str(tmp_path / "d.png"),
                     "--token", TOKEN]) == 0  # fmt: skip
        gan, diffusion = capsys.readouterr().out.splitlines()
        assert gan.startswith("2 images from gan_generator/1") and diffusion.startswith("2 images from diffusion_")
        assert main([*common, "--out", str(tmp_path / "no.png"), "--token", "wrong"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        load = ["loadtest", server.address, "--rpc", "generate-stream", "--model", "diffusion", "--steps", "2",
                "--requests", "6", "-c", "2", "--warmup", "0", "--quiet", "--token", TOKEN]  # fmt: skip
        assert main(load) == 0
        assert "ok 6" in capsys.readouterr().out
    finally:
        server.stop()


def test_written_images_are_pngs(tmp_path: Path) -> None:
    """_scaled keeps PNG output (the grid is PNG in, PNG out)."""
    from services.cli import _scaled

    buffer = io.BytesIO()
    Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4), mode="L").save(buffer, format="PNG")
    out = Image.open(io.BytesIO(_scaled(buffer.getvalue(), 2)))
    assert out.format == "PNG" and out.size == (8, 8) and out.mode == "L"


def test_ctrl_c_during_a_call_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """A server that accepts the connection and never answers: the call hangs until Ctrl-C."""
    import signal

    image = a_png(tmp_path / "a.png")
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        env = {k: v for k, v in os.environ.items() if not k.startswith("NNSERVE_")}
        command = [sys.executable, "-m", "services.cli", "classify", str(image), "--timeout", "120",
                   "--address", f"127.0.0.1:{mute.getsockname()[1]}"]  # fmt: skip
        # As from a terminal: a suite run as a background job of a non-interactive shell inherits
        # SIGINT ignored, and Python then installs no KeyboardInterrupt for the child to raise.
        default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
        proc = subprocess.Popen(
            command, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint
        )
        connection, _ = mute.accept()  # the client is inside its call now
        with connection:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip() == "nnserve classify: interrupted"
