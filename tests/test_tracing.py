"""OpenTelemetry tracing against real servers: the spans a call makes, their parents and attributes.

The in-process tests serve the tiny classifier from a real grpc.aio (and aiohttp) server in this
process, with the SDK's in-memory exporter; the last test runs the service as its own process with
tracing switched on by its flag and the exporter configured only by OTEL_* variables, and receives
the spans with an OTLP collector of its own.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

pytest.importorskip("opentelemetry.sdk", reason="the tracing extra is not installed")

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402
from PIL import Image  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from services.classify.__main__ import build  # noqa: E402
from services.classify.settings import ClassifySettings  # noqa: E402
from services.client import tensor_message  # noqa: E402
from services.core import tracing  # noqa: E402
from services.core.http import HttpServer  # noqa: E402
from services.core.server import GrpcServer  # noqa: E402
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc  # noqa: E402
from tests.helpers import ROOT, start_service  # noqa: E402

CLASSIFY = "nnserve.v1.ClassifyService/Classify"
# A caller's W3C trace context: version 00, trace id, parent span id, sampled.
TRACE_IDS = [0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x0AF7651916CD43DD8448EB211C80319C]
PARENT_IDS = [0x00F067AA0BA902B7, 0x0B9C7C989F97918E]


def traceparent(i: int) -> str:
    return f"00-{TRACE_IDS[i]:032x}-{PARENT_IDS[i]:016x}-01"


def request(rows: int) -> classify_pb2.ClassifyRequest:
    return classify_pb2.ClassifyRequest(tensor=tensor_message(np.zeros((rows, 28, 28), np.uint8)))


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.configure("classify", provider)
    try:
        yield memory
    finally:
        tracing.shutdown()


def serve(repository: Path, **overrides: Any) -> tuple[ClassifySettings, Any]:
    settings = ClassifySettings(model_repository=repository, port=0, metrics_port=None, http_port=0, **overrides)
    return settings, build(settings, CollectorRegistry())


def by_trace(spans: list[ReadableSpan], trace_id: int) -> dict[str, list[ReadableSpan]]:
    named: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        if span.context.trace_id == trace_id:
            named.setdefault(span.name, []).append(span)
    return named


def test_a_call_continues_the_callers_trace_with_queue_batch_and_inference_spans(
    tiny_repository: Path, exporter: InMemorySpanExporter
) -> None:
    """Two callers' requests (1 and 2 rows) queue for the model: each call's SERVER span is a child
    of its caller's span, and has queue_wait and batch children, the batch an inference child; the
    model, version and batch size are attributes."""
    settings, service = serve(tiny_repository, max_delay_ms=200, inline_max_rows=0)

    async def run() -> list[Any]:
        server = GrpcServer(service, settings)
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = classify_pb2_grpc.ClassifyServiceStub(channel)
                calls = [
                    stub.Classify(
                        request(i + 1),
                        metadata=(("traceparent", traceparent(i)), ("x-request-id", f"caller-{i}")),
                        timeout=10,
                    )
                    for i in range(2)
                ]
                return list(await asyncio.gather(*calls))
        finally:
            await server.stop(1.0)

    replies = asyncio.run(run())
    assert [len(r.classifications) for r in replies] == [1, 2]
    spans = list(exporter.get_finished_spans())
    for i, trace_id in enumerate(TRACE_IDS):
        named = by_trace(spans, trace_id)
        assert sorted(named) == ["batch", "inference", CLASSIFY, "queue_wait"], sorted(named)
        assert all(len(group) == 1 for group in named.values()), named
        server_span, queue, batch, inference = (named[n][0] for n in (CLASSIFY, "queue_wait", "batch", "inference"))
        assert server_span.kind == SpanKind.SERVER
        assert server_span.parent is not None and server_span.parent.span_id == PARENT_IDS[i]
        assert server_span.parent.is_remote
        attributes = server_span.attributes or {}
        assert attributes["rpc.system"] == "grpc"
        assert attributes["rpc.service"] == "nnserve.v1.ClassifyService"
        assert attributes["rpc.method"] == "Classify"
        assert attributes["rpc.grpc.status_code"] == 0
        assert attributes["nnserve.request_id"] == f"caller-{i}"
        assert attributes["nnserve.model.name"] == "classifier"
        assert attributes["nnserve.model.version"] == "2"
        assert server_span.status.status_code != StatusCode.ERROR
        for child in (queue, batch):
            assert child.parent is not None and child.parent.span_id == server_span.context.span_id
        assert inference.parent is not None and inference.parent.span_id == batch.context.span_id
        facts = batch.attributes or {}
        rows = i + 1
        assert facts["nnserve.request.rows"] == rows
        assert facts["nnserve.model.name"] == "classifier" and facts["nnserve.model.version"] == "2"
        # Merged or not, the batch's size is the rows of the requests it ran.
        expected = 3 if facts["nnserve.batch.requests"] == 2 else rows
        assert facts["nnserve.batch.size"] == expected == attributes["nnserve.batch.size"]
        assert batch.start_time <= inference.start_time <= inference.end_time <= batch.end_time
        assert queue.start_time <= queue.end_time
        assert server_span.start_time <= queue.start_time and batch.end_time <= server_span.end_time


def test_failed_untraced_and_http_calls(tiny_repository: Path, exporter: InMemorySpanExporter) -> None:
    """A client's bad request: a span with its code and no ERROR status (the server did not fail)
    and no model spans. A call without traceparent starts a trace of its own. An HTTP request
    continues its traceparent header, and answers its X-Request-Id."""
    settings, service = serve(tiny_repository)

    async def run() -> tuple[grpc.StatusCode, dict[str, str]]:
        server = GrpcServer(service, settings)
        port = await server.start()
        http = HttpServer(service, settings, server.interceptor)
        http_port = await http.start()
        server.also_close.append(http.stop)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = classify_pb2_grpc.ClassifyServiceStub(channel)
                bad = stub.Classify(classify_pb2.ClassifyRequest(), metadata=(("traceparent", traceparent(0)),))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await bad
                await stub.Classify(request(1), timeout=10)
            png = io.BytesIO()
            Image.fromarray(np.zeros((28, 28), np.uint8)).save(png, format="PNG")
            headers = {"Content-Type": "image/png", "traceparent": traceparent(1), "X-Request-Id": "http-1"}
            posted = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v1/classify", data=png.getvalue(), headers=headers, method="POST"
            )
            reply = await asyncio.get_running_loop().run_in_executor(
                None, lambda: urllib.request.urlopen(posted, timeout=10)
            )
            return refused.value.code(), dict(reply.headers)
        finally:
            await server.stop(1.0)

    code, http_headers = asyncio.run(run())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    spans = list(exporter.get_finished_spans())
    failed = by_trace(spans, TRACE_IDS[0])
    assert list(failed) == [CLASSIFY]
    attributes = failed[CLASSIFY][0].attributes or {}
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert failed[CLASSIFY][0].status.status_code != StatusCode.ERROR
    roots = [s for s in spans if s.name == CLASSIFY and s.parent is None]
    assert len(roots) == 1 and roots[0].context.trace_id not in TRACE_IDS
    assert {"inference", "batch"} <= set(by_trace(spans, roots[0].context.trace_id))
    assert http_headers["X-Request-Id"] == "http-1"
    http_spans = by_trace(spans, TRACE_IDS[1])
    route = "POST /v1/classify"
    assert route in http_spans, sorted(http_spans)
    span = http_spans[route][0]
    assert span.kind == SpanKind.SERVER and span.parent is not None and span.parent.span_id == PARENT_IDS[1]
    facts = span.attributes or {}
    assert facts["http.response.status_code"] == 200 and facts["nnserve.model.name"] == "classifier"
    assert facts["nnserve.request_id"] == "http-1"
    assert "inference" in http_spans


def test_with_tracing_off_no_span_is_made(tiny_repository: Path) -> None:
    """Off (the default), the interceptor and batcher make no spans: a provider set as the global one
    sees none."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    from opentelemetry import trace

    trace.set_tracer_provider(provider)
    assert not tracing.enabled
    settings, service = serve(tiny_repository, inline_max_rows=0)

    async def run() -> None:
        server = GrpcServer(service, settings)
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = classify_pb2_grpc.ClassifyServiceStub(channel)
                await stub.Classify(request(1), metadata=(("traceparent", traceparent(0)),), timeout=10)
        finally:
            await server.stop(1.0)

    asyncio.run(run())
    provider.force_flush()
    assert memory.get_finished_spans() == ()


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: keeps what exporters send it."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.received = threading.Event()

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (the proto's name)
        self.requests.append(request)
        self.received.set()
        return trace_service_pb2.ExportTraceServiceResponse()


def test_a_service_process_exports_by_otlp_as_the_otel_variables_say(
    tiny_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector = _Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "classify-under-test")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    server = start_service("services.classify", tiny_repository, tmp_path, "--tracing")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = classify_pb2_grpc.ClassifyServiceStub(channel)
            stub.Classify(request(1), metadata=(("traceparent", traceparent(0)),), timeout=10)
        deadline = time.monotonic() + 30
        names: set[str] = set()
        while time.monotonic() < deadline and CLASSIFY not in names:
            collector.received.wait(0.2)
            names = {
                span.name
                for req in collector.requests
                for rs in req.resource_spans
                for ss in rs.scope_spans
                for span in ss.spans
                if span.trace_id == TRACE_IDS[0].to_bytes(16, "big")
            }
        assert {CLASSIFY, "inference", "batch"} <= names, names
        services = {
            attr.value.string_value
            for req in collector.requests
            for rs in req.resource_spans
            for attr in rs.resource.attributes
            if attr.key == "service.name"
        }
        assert services == {"classify-under-test"}
    finally:
        assert server.stop() == 0
        receiver.stop(0)
        os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)


def test_tracing_on_without_the_extra_is_one_clear_line(tiny_repository: Path) -> None:
    """`--tracing` where OpenTelemetry is not installed: exit 2 with one line that says what to install."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['opentelemetry'] = None\n"  # as if the tracing extra were not installed
        "from services.classify.__main__ import main\n"
        f"raise SystemExit(main(['--tracing', '--workers', '1', '--port', '0', '--metrics-port', 'none', "
        f"'--http-port', 'none', '--model-repository', {str(tiny_repository)!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "pip install 'nnserve[tracing]'" in result.stderr.splitlines()[-1]


def test_generation_spans_gan_batches_and_diffusion_sampling(
    tiny_repository: Path, exporter: InMemorySpanExporter
) -> None:
    """A GAN call runs through the dynamic batcher (batch and inference spans); a diffusion call
    through the step batcher: its queue_wait and one sampling span with the steps it ran. Both
    calls' spans name the model."""
    from services.generate.__main__ import build as build_generate
    from services.generate.settings import GenerateSettings
    from services.proto.nnserve.v1 import generate_pb2, generate_pb2_grpc

    settings = GenerateSettings(model_repository=tiny_repository, port=0, metrics_port=None, http_port=None)
    service = build_generate(settings, CollectorRegistry())

    async def run() -> None:
        server = GrpcServer(service, settings)
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = generate_pb2_grpc.GenerateServiceStub(channel)
                gan = generate_pb2.GenerateRequest(model=generate_pb2.GENERATOR_MODEL_GAN, count=2, seed=1)
                await stub.Generate(gan, metadata=(("traceparent", traceparent(0)),), timeout=30)
                diffusion = generate_pb2.GenerateRequest(
                    model=generate_pb2.GENERATOR_MODEL_DIFFUSION,
                    count=2,
                    seed=1,
                    diffusion=generate_pb2.DiffusionOptions(steps=4),
                )
                await stub.Generate(diffusion, metadata=(("traceparent", traceparent(1)),), timeout=30)
        finally:
            await server.stop(1.0)

    asyncio.run(run())
    spans = list(exporter.get_finished_spans())
    method = "nnserve.v1.GenerateService/Generate"
    gan_spans = by_trace(spans, TRACE_IDS[0])
    assert {method, "batch", "inference"} <= set(gan_spans), sorted(gan_spans)
    assert (gan_spans[method][0].attributes or {})["nnserve.model.name"] == "gan_generator"
    assert (gan_spans["batch"][0].attributes or {})["nnserve.batch.size"] == 2
    sampling_spans = by_trace(spans, TRACE_IDS[1])
    assert {method, "queue_wait", "sampling"} <= set(sampling_spans), sorted(sampling_spans)
    server_span, sampling = sampling_spans[method][0], sampling_spans["sampling"][0]
    assert (server_span.attributes or {})["nnserve.model.name"] == "diffusion_denoiser"
    facts = sampling.attributes or {}
    assert facts["nnserve.model.name"] == "diffusion_denoiser" and facts["nnserve.request.rows"] >= 2
    assert facts["nnserve.sampling.steps"] == 4
    assert sampling.parent is not None and sampling.parent.span_id == server_span.context.span_id
    assert sampling.status.status_code != StatusCode.ERROR
