"""The web console's gateway against real services: every route, its successes and its error paths."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import urllib3
from PIL import Image

from services.client import ClassifyClient, GenerateClient
from tests.helpers import ROOT, ServiceProcess, metric_value, start_service

STATIC = ROOT / "services" / "console" / "static"
HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=10, read=120))


@dataclass
class ConsoleProcess:
    """The console started as its own process, as `nnserve serve console` runs it."""

    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics_text(self) -> str:
        return HTTP.request("GET", f"http://127.0.0.1:{self.metrics_port}/metrics").data.decode()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def start_console(workdir: Path, classify: str, restore: str, generate: str, *args: str) -> ConsoleProcess:
    """Start ``python -m services.console`` on free ports, calling the given gRPC targets."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"console-{time.monotonic_ns()}.json"
    log_path = port_file.with_suffix(".log")
    command = [
        sys.executable, "-m", "services.console", "--port", "0", "--metrics-port", "0", "--port-file", str(port_file),
        "--classify-target", classify, "--restore-target", restore, "--generate-target", generate, *args,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNSERVE_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the console did not start (exit {proc.poll()}):\n{log_path.read_text()}")
        time.sleep(0.05)
    info = json.loads(port_file.read_text())
    return ConsoleProcess(proc, info["port"], info["metrics_port"], log_path)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def pixels_of(data_url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    import base64

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :]))))


def item() -> np.ndarray:
    """A light rectangle on black: a 28x28 image in the training data's style."""
    pixels = np.zeros((28, 28), np.uint8)
    pixels[4:24, 8:20] = 200
    return pixels


def post_form(url: str, fields: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    reply = HTTP.request("POST", url, fields=fields)
    return reply.status, json.loads(reply.data)


def post_json(url: str, body: Any) -> tuple[int, dict[str, Any]]:
    reply = HTTP.request("POST", url, body=json.dumps(body), headers={"Content-Type": "application/json"})
    return reply.status, json.loads(reply.data)


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    reply = HTTP.request("GET", url)
    return reply.status, json.loads(reply.data)


class EventStream:
    """A Server-Sent Events reply read event by event; close() drops the connection."""

    def __init__(self, console: ConsoleProcess, body: dict[str, Any]) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", console.port, timeout=120)
        self.connection.request(
            "POST", "/api/generate/stream", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        self.response = self.connection.getresponse()
        self.status = self.response.status
        self.content_type = self.response.getheader("Content-Type", "")

    def json(self) -> dict[str, Any]:
        return json.loads(self.response.read())

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        event, data = "message", ""
        for raw in self.response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
            elif not line and data:
                yield event, json.loads(data)
                event, data = "message", ""

    def close(self) -> None:
        self.response.close()
        self.connection.close()


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until true (no timing assertion: only a generous bound on a hang)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generate_small(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The generate service on the stand-in models, with room for 24 denoiser rows in flight."""
    server = start_service(
        "services.generate", tiny_repository, tmp_path_factory.mktemp("generate"),
        "--max-count", "16", "--max-step-rows-per-request", "200000", "--max-rows-in-flight", "24",
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def console(
    classify_server: ServiceProcess,
    restore_server: ServiceProcess,
    generate_small: ServiceProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ConsoleProcess]:
    process = start_console(
        tmp_path_factory.mktemp("console"),
        classify_server.address,
        restore_server.address,
        generate_small.address,
        "--max-upload-bytes",
        "200000",
    )
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def broken_console(
    restore_server: ServiceProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ConsoleProcess]:
    """A console whose 'classify' is the restore service (UNIMPLEMENTED) and whose restore and
    generate services are down (nothing listens on port 1)."""
    process = start_console(tmp_path_factory.mktemp("broken"), restore_server.address, "127.0.0.1:1", "127.0.0.1:1")
    yield process
    assert process.stop() == 0


# ---- the page ------------------------------------------------------------------------------


def test_page_and_static_files_are_served(console: ConsoleProcess) -> None:
    page = HTTP.request("GET", console.url + "/")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b"nnserve console" in page.data
    for path in re.findall(rb'(?:src|href)="(/static/[^"]+)"', page.data):
        assert HTTP.request("GET", console.url + path.decode()).status == 200, path
    status, body = get_json(console.url + "/api/examples")
    assert status == 200 and len(body["examples"]) == 10
    assert HTTP.request("GET", console.url + body["examples"][0]["url"]).data.startswith(b"\x89PNG")
    assert get_json(console.url + "/healthz") == (200, {"ok": True})


def test_page_fetches_nothing_from_the_internet() -> None:
    """No CDN, no web fonts: every URL the page's files name is a path on the console."""
    for path in STATIC.glob("*.*"):
        text = path.read_text()
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import", text, re.IGNORECASE), path


def test_unknown_route_answers_json_404(console: ConsoleProcess) -> None:
    status, body = get_json(console.url + "/api/nothing")
    assert status == 404 and body["error"]


# ---- status --------------------------------------------------------------------------------


def test_status_lists_health_and_model_versions(console: ConsoleProcess) -> None:
    status, body = get_json(console.url + "/api/status")
    assert status == 200
    services = {s["name"]: s for s in body["services"]}
    assert {s["health"] for s in services.values()} == {"SERVING"}
    models = {name: {(m["name"], m["version"], m["ready"]) for m in s["models"]} for name, s in services.items()}
    assert models == {
        "classify": {("classifier", "2", True)},  # the highest version in the repository
        "restore": {("autoencoder", "1", True)},
        "generate": {("gan_generator", "1", True), ("diffusion_denoiser", "1", True)},
    }


def test_status_shows_a_service_that_is_down(broken_console: ConsoleProcess) -> None:
    status, body = get_json(broken_console.url + "/api/status")
    assert status == 200
    restore = next(s for s in body["services"] if s["name"] == "restore")
    assert restore["health"] == "UNAVAILABLE" and restore["error"] and restore["models"] == []
    assert restore["target"] == "127.0.0.1:1"


# ---- classify ------------------------------------------------------------------------------


def test_classify_relays_the_service_reply(console: ConsoleProcess, classify_server: ServiceProcess) -> None:
    image = png(item())
    status, body = post_form(console.url + "/api/classify", {"image": ("item.png", image, "image/png"), "top_k": "3"})
    assert status == 200, body
    with ClassifyClient(classify_server.address) as client:
        direct = client.classify(images=[image], top_k=3).classifications[0]
    assert [p["label"] for p in body["predictions"]] == [p.label for p in direct.predictions]
    assert [p["class_id"] for p in body["predictions"]] == [p.class_id for p in direct.predictions]
    np.testing.assert_allclose(
        [p["probability"] for p in body["predictions"]], [p.probability for p in direct.predictions]
    )
    assert (
        body["ood_score"] == pytest.approx(direct.ood_score)
        and body["out_of_distribution"] is direct.out_of_distribution
    )
    assert (body["model"], body["version"]) == ("classifier", 2)


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"image": ("x.png", b"not an image", "image/png")}, 400, "classify: INVALID_ARGUMENT: images[0]"),
        ({"image": ("x.png", png(item()), "image/png"), "top_k": "11"}, 400, "INVALID_ARGUMENT: top_k"),
        ({"image": ("x.png", png(item()), "image/png"), "top_k": "three"}, 400, "top_k: must be an integer"),
        ({"image": ("x.png", png(item()), "image/png"), "top_k": ("k.txt", b"3", "text/plain")}, 400, "top_k: must"),
        ({"image": ("x.png", png(item()), "image/png"), "model_version": "99"}, 404, "NOT_FOUND: model_version"),
        ({"top_k": "3"}, 400, "image: missing"),
        ({"image": "text, not a file"}, 400, "image: must be a file upload"),
        ({"image": ("x.png", b"", "image/png")}, 400, "image: the uploaded file is empty"),
    ],
)
def test_classify_errors(console: ConsoleProcess, fields: dict[str, Any], status: int, message: str) -> None:
    answer, body = post_form(console.url + "/api/classify", fields)
    assert (answer, set(body) >= {"error"}) == (status, True), body
    assert message in body["error"]


def test_body_that_is_not_a_form_or_too_large(console: ConsoleProcess) -> None:
    status, body = post_json(console.url + "/api/classify", {"image": "x"})
    assert status == 400 and "multipart/form-data" in body["error"]
    big = {"image": ("big.png", b"\0" * 300_000, "image/png")}
    status, body = post_form(console.url + "/api/classify", big)
    assert status == 413 and "200000 bytes" in body["error"]


def test_service_errors_map_to_http_statuses(broken_console: ConsoleProcess) -> None:
    image = {"image": ("x.png", png(item()), "image/png")}
    status, body = post_form(broken_console.url + "/api/classify", image)  # the restore service has no Classify
    assert (status, body["code"], body["service"]) == (502, "UNIMPLEMENTED", "classify"), body
    status, body = post_form(broken_console.url + "/api/restore", image)  # nothing listens
    assert (status, body["code"]) == (503, "UNAVAILABLE"), body
    assert body["error"].startswith("restore: UNAVAILABLE: ")
    for route in ("/api/generate", "/api/generate/stream"):
        status, body = post_json(broken_console.url + route, {"model": "gan"})
        assert (status, body["code"], body["service"]) == (503, "UNAVAILABLE", "generate"), (route, body)


def test_deadline_exceeded_answers_504(generate_small: ServiceProcess, tmp_path: Path) -> None:
    console = start_console(tmp_path, "127.0.0.1:1", "127.0.0.1:1", generate_small.address, "--timeout-s", "0.01")
    try:
        # 1000 sequential denoiser steps cannot finish within the console's 10 ms deadline.
        request = {"model": "diffusion", "count": 4, "steps": 1000, "seed": 1}
        status, body = post_json(console.url + "/api/generate", request)
        assert (status, body["code"]) == (504, "DEADLINE_EXCEEDED"), body
    finally:
        assert console.stop() == 0


# ---- restore -------------------------------------------------------------------------------


def test_restore_damages_with_the_mask_and_shows_all_three(console: ConsoleProcess) -> None:
    mask = np.zeros((28, 28), np.uint8)
    mask[10:16, 10:16] = 255
    fields = {"image": ("i.png", png(item()), "image/png"), "mask": ("m.png", png(mask), "image/png"), "noise": "0"}
    status, body = post_form(console.url + "/api/restore", fields)
    assert status == 200, body
    clean, damaged, restored = (pixels_of(body[k]).astype(int) for k in ("input", "damaged", "restored"))
    hole = mask > 0
    np.testing.assert_array_equal(clean, item())
    assert (damaged[hole] == 255).all() and (damaged[~hole] == clean[~hole]).all()
    # The stand-in restorer fills masked pixels with 0.5 and keeps the rest.
    assert (np.abs(restored[hole] - 128) <= 1).all() and (np.abs(restored[~hole] - clean[~hole]) <= 1).all()
    assert body["masked_pixels"] == 36 and (body["model"], body["version"]) == ("autoencoder", 1)
    assert isinstance(body["anomaly_score"], float) and isinstance(body["anomalous"], bool)


def test_restore_noise_follows_the_seed(console: ConsoleProcess) -> None:
    def damaged(seed: str) -> np.ndarray:
        fields = {"image": ("i.png", png(item()), "image/png"), "noise": "0.3", "seed": seed}
        status, body = post_form(console.url + "/api/restore", fields)
        assert status == 200, body
        assert body["seed"] == seed and body["masked_pixels"] == 0
        return pixels_of(body["damaged"]).astype(int)

    first, again, other = damaged("7"), damaged("7"), damaged("8")
    np.testing.assert_array_equal(first, again)
    assert (first != item()).mean() > 0.5 and (first != other).any()


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"image": ("i.png", b"garbage", "image/png")}, 400, "image: "),
        ({"image": ("i.png", png(item()), "image/png"), "mask": ("m.png", b"garbage", "image/png")}, 400, "mask: "),
        ({"image": ("i.png", png(item()), "image/png"), "noise": "2"}, 400, "noise: 2.0 is out of range (0..1)"),
        ({"image": ("i.png", png(item()), "image/png"), "noise": "nan"}, 400, "noise: must be a finite number"),
        ({"image": ("i.png", png(item()), "image/png"), "seed": "-1"}, 400, "seed: -1 is out of range"),
        ({"image": ("i.png", png(item()), "image/png"), "model_version": "9"}, 404, "restore: NOT_FOUND: "),
    ],
)
def test_restore_errors(console: ConsoleProcess, fields: dict[str, Any], status: int, message: str) -> None:
    answer, body = post_form(console.url + "/api/restore", fields)
    assert answer == status and message in body["error"], body


# ---- generate ------------------------------------------------------------------------------


def test_generate_gan_grid_matches_the_typed_client(console: ConsoleProcess, generate_small: ServiceProcess) -> None:
    status, body = post_json(console.url + "/api/generate", {"model": "gan", "count": 4, "label": 3, "seed": 11})
    assert status == 200, body
    with GenerateClient(generate_small.address) as client:
        direct = client.generate(model="gan", count=4, labels=[3], seed=11, output="grid")
    assert pixels_of(body["grid"]).tobytes() == np.asarray(Image.open(io.BytesIO(direct.grid_png))).tobytes()
    assert body["labels"] == [3, 3, 3, 3] and body["seed"] == "11" and body["model"] == "gan_generator"


@pytest.mark.parametrize(
    ("request_body", "status", "message"),
    [
        ({"model": "vae"}, 400, "model: must be 'gan' or 'diffusion'"),
        ({"model": "gan", "count": "many"}, 400, "count: must be an integer"),
        ({"model": "gan", "count": 0}, 400, "generate: INVALID_ARGUMENT: count: 0 is out of range"),
        ({"model": "gan", "count": 17}, 400, "count"),
        ({"model": "gan", "label": -1}, 400, "label: -1 is out of range"),
        ({"model": "gan", "label": 12}, 400, "generate: "),
        ({"model": "gan", "labels": "3"}, 400, "labels: must be a list"),
        ({"model": "diffusion", "steps": 5000}, 400, "generate: INVALID_ARGUMENT: diffusion.steps"),
        ({"model": "diffusion", "guidance_scale": "lots"}, 400, "guidance_scale: must be a number"),
        ({"model": "diffusion", "sampler": "euler"}, 400, "sampler: must be 'ddim' or 'ddpm'"),
        ({"model": "diffusion", "count": 16, "steps": 2}, 429, "generate: RESOURCE_EXHAUSTED: 32 rows per step"),
        (["gan"], 400, "body: must be a JSON object"),
    ],
)
def test_generate_errors(console: ConsoleProcess, request_body: Any, status: int, message: str) -> None:
    for route in ("/api/generate", "/api/generate/stream"):
        answer, body = post_json(console.url + route, request_body)
        assert answer == status and message in body["error"], (route, body)


def test_invalid_json_body(console: ConsoleProcess) -> None:
    reply = HTTP.request(
        "POST", console.url + "/api/generate", body=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert reply.status == 400 and "body: is not valid JSON" in json.loads(reply.data)["error"]


def test_stream_reports_every_step_then_the_same_grid_as_generate(console: ConsoleProcess) -> None:
    request = {"model": "diffusion", "count": 4, "label": 2, "seed": 5, "steps": 6, "preview_every": 3}
    stream = EventStream(console, request)
    assert stream.status == 200 and stream.content_type.startswith("text/event-stream")
    events = list(stream)
    stream.close()
    names = [name for name, _ in events]
    assert names == ["started", *["progress"] * 6, "result"], names
    progress = [data for name, data in events if name == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5, 6] and {p["total"] for p in progress} == {6}
    assert [p["preview"] is not None for p in progress] == [False, False, True, False, False, True]
    result = events[-1][1]
    assert result["labels"] == [2] * 4 and result["seed"] == "5"
    status, unary = post_json(console.url + "/api/generate", {k: v for k, v in request.items() if k != "preview_every"})
    assert status == 200 and pixels_of(unary["grid"]).tobytes() == pixels_of(result["grid"]).tobytes()


def cancelled_jobs(generate: ServiceProcess) -> float:
    text = generate.metrics_text()
    return metric_value(text, "nnserve_batch_rejected_total", model="diffusion_denoiser", reason="cancelled")


# A run long enough that it is still sampling when the test stops it: 1000 DDPM steps of 24 rows
# (over a second of model calls), against a stop that costs two local HTTP hops.
LONG_RUN = {"model": "diffusion", "count": 12, "steps": 1000, "sampler": "ddpm", "seed": 3}


def test_stop_cancels_the_stream_on_the_generate_service(
    console: ConsoleProcess, generate_small: ServiceProcess
) -> None:
    jobs = cancelled_jobs(generate_small)
    stream = EventStream(console, LONG_RUN)
    events = iter(stream)
    name, started = next(events)
    assert name == "started"
    assert next(events)[0] == "progress"
    status, body = post_json(console.url + f"/api/generate/stop/{started['id']}", {})
    assert (status, body) == (200, {"stopped": started["id"]})
    rest = [name for name, _ in events]
    stream.close()
    assert rest[-1] == "stopped" and "result" not in rest
    wait_for(lambda: cancelled_jobs(generate_small) == jobs + 1, "the sampler to drop the job")
    assert metric_value(console.metrics_text(), "nnserve_console_generate_streams_total", outcome="stopped") >= 1
    status, body = post_json(console.url + f"/api/generate/stop/{started['id']}", {})
    assert status == 404 and "no running generation" in body["error"]


def test_disconnecting_cancels_the_stream_on_the_generate_service(
    console: ConsoleProcess, generate_small: ServiceProcess
) -> None:
    jobs = cancelled_jobs(generate_small)
    stream = EventStream(console, LONG_RUN)
    events = iter(stream)
    assert [next(events)[0], next(events)[0]] == ["started", "progress"]
    stream.close()  # as a closed tab or the page's Stop before the stream had its id
    wait_for(lambda: cancelled_jobs(generate_small) == jobs + 1, "the sampler to drop the job")
    wait_for(
        lambda: (
            metric_value(console.metrics_text(), "nnserve_console_generate_streams_total", outcome="disconnected") >= 1
        ),
        "the console to count the disconnect",
    )


def test_an_error_in_mid_stream_arrives_as_an_event(
    tiny_repository: Path, classify_server: ServiceProcess, tmp_path: Path
) -> None:
    """The generate service stops (no grace period) while a stream runs: the page gets an error event."""
    generate = start_service(
        "services.generate", tiny_repository, tmp_path / "generate", "--shutdown-delay-s", "0", "--grace-period-s", "0"
    )
    console = start_console(tmp_path / "console", classify_server.address, classify_server.address, generate.address)
    try:
        stream = EventStream(console, LONG_RUN)
        events = iter(stream)
        assert [next(events)[0], next(events)[0]] == ["started", "progress"]
        generate.proc.send_signal(signal.SIGTERM)
        rest = list(events)
        stream.close()
        name, error = rest[-1]
        assert name == "error" and error["service"] == "generate", rest[-1]
        assert error["status"] in (502, 503) and error["error"].startswith(f"generate: {error['code']}")
        assert metric_value(console.metrics_text(), "nnserve_console_generate_streams_total", outcome="failed") == 1
    finally:
        assert console.stop() == 0
        generate.stop()


# ---- metrics and settings ------------------------------------------------------------------


def test_console_counts_requests_by_route_and_status(console: ConsoleProcess) -> None:
    before = metric_value(console.metrics_text(), "nnserve_console_http_requests_total", route="/api/status")
    get_json(console.url + "/api/status")
    get_json(console.url + "/no/such/page")
    text = console.metrics_text()
    assert metric_value(text, "nnserve_console_http_requests_total", route="/api/status", status="200") == before + 1
    assert metric_value(text, "nnserve_console_http_requests_total", route="unmatched", status="404") >= 1


def test_serve_console_help_lists_settings_with_their_environment_names() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "console", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "--generate-target" in result.stdout and "NNSERVE_CONSOLE_GENERATE_TARGET" in result.stdout


def test_bad_setting_exits_with_a_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.console", "--port", "99999"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2 and "port" in result.stderr


def test_up_starts_the_console_next_to_the_services(tiny_repository: Path) -> None:
    """`nnserve up` starts the console too, pointed at the services it started, and prints its address."""
    import random
    import socket

    from services.cli import SERVICES

    ports = [p for spec in SERVICES.values() for p in (spec.port, spec.metrics_port)]
    for _ in range(100):
        offset = random.randint(-9000, 10000)
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + offset))
            break
        except (OSError, OverflowError):  # taken, or beyond 0-65535
            continue
    command = [
        sys.executable, "-m", "services.cli", "up", "--model-repository", str(tiny_repository),
        "--port-offset", str(offset), "--only", "classify", "console",
    ]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    while not lines or ("stop: Ctrl-C" not in lines[-1] and lines[-1]):
        lines.append(proc.stdout.readline())
    text = "".join(lines)
    try:
        url = f"http://127.0.0.1:{9080 + offset}/"
        assert f"console   web  {url}" in text, text
        assert HTTP.request("GET", url).status == 200
        status, body = get_json(url + "api/status")
        health = {s["name"]: s["health"] for s in body["services"]}
        assert health["classify"] == "SERVING" and health["restore"] == "UNAVAILABLE", body
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, text


def test_compose_runs_the_console_from_the_serving_image() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    console = compose["services"]["console"]
    assert console["image"] == compose["services"]["classify"]["image"] and console["command"] == ["console"]
    env = console["environment"]
    for name, port in (("classify", 50051), ("restore", 50052), ("generate", 50053)):
        assert env[f"NNSERVE_CONSOLE_{name.upper()}_TARGET"] == f"dns:///{name}:{port}"  # every replica
    assert "/healthz" in " ".join(console["healthcheck"]["test"]) and console["read_only"]
