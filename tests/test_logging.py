"""Request ids, JSON logs and the access log, from a real service started as a user starts it
(`nnserve serve classify --log-format json --access-log`)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from services.client import tensor_message
from services.core import logs
from services.processes import launch, wait_until_serving
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc
from tests.helpers import ROOT, ServiceProcess

REQUEST = classify_pb2.ClassifyRequest(tensor=tensor_message(np.zeros((1, 28, 28), np.uint8)))
GENERATED = re.compile(r"^[0-9a-f]{32}$")  # uuid4().hex
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")


@pytest.fixture(scope="module")
def json_server(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The classify service started through the CLI with JSON logs and the access log on."""
    workdir = tmp_path_factory.mktemp("logging")
    port_file = workdir / "ports.json"
    log_path = workdir / "service.log"
    args = ["serve", "classify", "--port", "0", "--metrics-port", "0", "--http-port", "0", "--workers", "1"]
    args += ["--model-repository", str(tiny_repository), "--log-format", "json", "--access-log"]
    with open(log_path, "wb") as log:
        launched = launch("services.cli", args, port_file, cwd=ROOT, output=log)
    try:
        wait_until_serving([launched], 60)
    except Exception:
        launched.proc.kill()
        raise RuntimeError(log_path.read_text()) from None
    info = launched.info
    server = ServiceProcess(launched.proc, info["port"], info["metrics_port"], log_path, info["http_port"])
    yield server
    server.stop()


def records(server: ServiceProcess, want: int = 0, **match: Any) -> list[dict[str, Any]]:
    """The service's JSON log records (each line one object) that have ``match``'s values; waits
    (briefly) for ``want`` of them, since a record is written after the reply it describes."""
    deadline = time.monotonic() + 10
    while True:
        found = []
        for line in server.log().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if all(record.get(k) == v for k, v in match.items()):
                    found.append(record)
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def trailing(call: Any) -> dict[str, str]:
    return dict(call.trailing_metadata() or ())


def test_the_request_id_is_echoed_or_generated_on_every_reply(json_server: ServiceProcess) -> None:
    with grpc.insecure_channel(json_server.address) as channel:
        stub = classify_pb2_grpc.ClassifyServiceStub(channel)
        _, given = stub.Classify.with_call(REQUEST, metadata=(("x-request-id", "order-42"),), timeout=10)
        assert trailing(given)["x-request-id"] == "order-42"
        _, generated = stub.Classify.with_call(REQUEST, timeout=10)
        assert GENERATED.match(trailing(generated)["x-request-id"])
        assert uuid.UUID(hex=trailing(generated)["x-request-id"]).version == 4
        with pytest.raises(grpc.RpcError) as failed:
            stub.Classify(classify_pb2.ClassifyRequest(), metadata=(("x-request-id", "bad-1"),), timeout=10)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert trailing(failed.value)["x-request-id"] == "bad-1"
        with pytest.raises(grpc.RpcError) as unknown:
            channel.unary_unary("/nnserve.v1.Nothing/Here")(b"", timeout=10)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert GENERATED.match(trailing(unknown.value)["x-request-id"])
        # An id that is no sane one (too long) is replaced, not echoed.
        _, replaced = stub.Classify.with_call(REQUEST, metadata=(("x-request-id", "x" * 500),), timeout=10)
        assert GENERATED.match(trailing(replaced)["x-request-id"])
        # Health checks answer it too, though they stay out of the access log.
        health = health_pb2_grpc.HealthStub(channel)
        _, probed = health.Check.with_call(health_pb2.HealthCheckRequest(), metadata=(("x-request-id", "probe-1"),))
        assert trailing(probed)["x-request-id"] == "probe-1"
    assert records(json_server, 1, logger="nnserve.access", request_id="bad-1")
    assert records(json_server, logger="nnserve.access", request_id="probe-1") == []


def test_http_replies_carry_the_request_id(json_server: ServiceProcess) -> None:
    png = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png, format="PNG")
    url = f"{json_server.http_url}/v1/classify"
    posted = urllib.request.Request(
        url, data=png.getvalue(), headers={"Content-Type": "image/png", "X-Request-Id": "web-7"}, method="POST"
    )
    with urllib.request.urlopen(posted, timeout=10) as reply:
        assert reply.headers["X-Request-Id"] == "web-7"
    bad = urllib.request.Request(url, data=b"not an image", headers={"Content-Type": "image/png"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(bad, timeout=10)
    assert refused.value.code == 400
    assert GENERATED.match(refused.value.headers["X-Request-Id"])
    (access,) = records(json_server, 1, logger="nnserve.access", request_id="web-7")
    assert access["route"] == "POST /v1/classify" and access["code"] == "200"
    assert access["model"] == "classifier" and access["version"] == "2"


def test_json_lines_and_one_access_record_per_call(json_server: ServiceProcess) -> None:
    with grpc.insecure_channel(json_server.address) as channel:
        stub = classify_pb2_grpc.ClassifyServiceStub(channel)
        stub.Classify(REQUEST, metadata=(("x-request-id", "access-ok"),), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.Classify(classify_pb2.ClassifyRequest(), metadata=(("x-request-id", "access-bad"),), timeout=10)
    (ok,) = records(json_server, 1, logger="nnserve.access", request_id="access-ok")
    assert ok["level"] == "INFO" and ok["code"] == "OK"
    assert ok["grpc_service"] == "nnserve.v1.ClassifyService" and ok["grpc_method"] == "Classify"
    assert ok["model"] == "classifier" and ok["version"] == "2"
    assert isinstance(ok["latency_ms"], float) and ok["latency_ms"] >= 0
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", ok["time"]), ok["time"]
    assert "access-ok" in ok["message"] and "OK" in ok["message"]
    (bad,) = records(json_server, 1, logger="nnserve.access", request_id="access-bad")
    assert bad["code"] == "INVALID_ARGUMENT" and "model" not in bad
    # Every line Python's logging wrote is JSON: the start-up lines too, none in the text format.
    lines = json_server.log().splitlines()
    assert not [line for line in lines if TEXT_LINE.match(line)]
    startup = records(json_server, logger="services.core.lifecycle")
    assert startup and all({"time", "level", "logger", "message"} <= set(r) for r in startup)


def test_generation_access_records_name_the_model(
    tiny_repository: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The generate service reaches its models without the data plane: its access records still
    name the model and version (a real grpc.aio server in this process, records caught by caplog)."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from services.core import logs
    from services.core.server import GrpcServer
    from services.generate.__main__ import build
    from services.generate.settings import GenerateSettings
    from services.proto.nnserve.v1 import generate_pb2, generate_pb2_grpc

    monkeypatch.setattr(logs, "access", True)
    settings = GenerateSettings(model_repository=tiny_repository, port=0, metrics_port=None, http_port=None)
    service = build(settings, CollectorRegistry())

    async def run() -> None:
        server = GrpcServer(service, settings)
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = generate_pb2_grpc.GenerateServiceStub(channel)
                for i, model in enumerate((generate_pb2.GENERATOR_MODEL_GAN, generate_pb2.GENERATOR_MODEL_DIFFUSION)):
                    request = generate_pb2.GenerateRequest(
                        model=model, count=1, seed=1, diffusion=generate_pb2.DiffusionOptions(steps=2)
                    )
                    await stub.Generate(request, metadata=(("x-request-id", f"gen-{i}"),), timeout=30)
        finally:
            await server.stop(1.0)

    with caplog.at_level(logging.INFO, logger="nnserve.access"):
        asyncio.run(run())
    found = {r.request_id: r for r in caplog.records if r.name == "nnserve.access"}  # type: ignore[attr-defined]
    assert "gan_generator/1" in found["gen-0"].getMessage() and found["gen-0"].code == "OK"  # type: ignore[attr-defined]
    assert "diffusion_denoiser/1" in found["gen-1"].getMessage()


def test_request_ids_are_uuid4_hex_unique_and_not_repeated_by_a_forked_worker() -> None:
    """Ids come from random bytes drawn 256 at a time; a forked worker (--workers) must draw its own."""
    ids = [logs.new_request_id() for _ in range(1000)]  # several draws
    assert len(set(ids)) == 1000
    assert all(uuid.UUID(i).version == 4 and uuid.UUID(i).hex == i for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        os.write(write, logs.new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert len(child) == 32 and child != logs.new_request_id()
