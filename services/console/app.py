"""The console's HTTP gateway: the page, a JSON API over the three gRPC services, and live generation.

Routes (JSON in and out unless noted; images travel as PNG data URLs):

    GET  /                          the page (static/index.html)
    GET  /api/status                each service's health and the models it serves, with readiness
    GET  /api/examples              the shipped example images
    POST /api/classify              multipart: image, [top_k], [model_version]
    POST /api/restore               multipart: image, [mask], [noise], [seed], [model_version]
    POST /api/generate              {"model", "count", "label", "seed", "steps", "guidance_scale", ...}
    POST /api/generate/stream       the same body; answers text/event-stream fed by GenerateStream
    POST /api/generate/stop/{id}    cancel a running stream on the generate service
    GET  /healthz                   the console's own liveness

A gRPC error becomes an HTTP status (INVALID_ARGUMENT and OUT_OF_RANGE 400, NOT_FOUND 404,
RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, anything else 502) with the body
``{"error": "<service>: <CODE>: <details>", "code": ..., "service": ...}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from aiohttp import web
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.client import GenerateClient, channel_options
from services.console.settings import ConsoleSettings
from services.core.convert import tensor_message
from services.core.errors import InvalidInput, shorten
from services.core.images import decode_image, encode_png
from services.core.metrics import DURATION_BUCKETS
from services.proto.inference import grpc_service_pb2 as oip_pb2
from services.proto.inference import grpc_service_pb2_grpc as oip_grpc
from services.proto.nnserve.v1 import (
    classify_pb2,
    classify_pb2_grpc,
    generate_pb2,
    generate_pb2_grpc,
    restore_pb2,
    restore_pb2_grpc,
)

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
SERVICE_NAMES = ("classify", "restore", "generate")
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# Damaged pixels are painted white, as the restore examples in the README occlude them.
DAMAGE_VALUE = 1.0
UINT32_MAX = 2**32 - 1
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

T = TypeVar("T")


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status the console answers for a service's gRPC status code."""
    return HTTP_STATUS.get(code, 502)


class ServiceError(Exception):
    """A service answered a call with a non-OK gRPC status."""

    def __init__(self, service: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{service}: {code.name}: {details}")
        self.service = service
        self.code = code
        self.status = http_status(code)

    def body(self) -> dict[str, str]:
        return {"error": str(self), "code": self.code.name, "service": self.service}


async def call(service: str, awaitable: Awaitable[T]) -> T:
    """Await one gRPC call, turning its failure into a :class:`ServiceError` naming the service."""
    try:
        return await awaitable
    except aio.AioRpcError as exc:
        raise ServiceError(service, exc.code(), exc.details() or "") from None


class ConsoleMetrics:
    """The console's own Prometheus metrics (the services export theirs)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "nnserve_console_http_requests_total",
            "HTTP requests answered, by route and status.",
            ["route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "nnserve_console_http_request_duration_seconds",
            "Time from an HTTP request to its complete answer.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.streams = Counter(
            "nnserve_console_generate_streams_total",
            "Streamed generations by outcome: completed, stopped (Stop), disconnected, failed.",
            ["outcome"],
            registry=registry,
        )
        self.streams_in_flight = Gauge(
            "nnserve_console_generate_streams_in_flight", "Streamed generations running now.", registry=registry
        )


class Backends:
    """grpc.aio channels to the three services, with the stubs the routes call."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.targets = {
            "classify": settings.classify_target,
            "restore": settings.restore_target,
            "generate": settings.generate_target,
        }
        # The CLI's options: round-robin over every replica a dns:/// name resolves to, skipping
        # NOT_SERVING ones, with UNAVAILABLE retried on another replica.
        options = channel_options(settings.max_message_bytes, round_robin=True, retry=True)
        self.channels = {name: aio.insecure_channel(t, options=options) for name, t in self.targets.items()}
        # The status strip gets plain channels: through the data channels a NOT_SERVING replica
        # would be skipped by client-side health checking, and the strip is there to show it.
        plain = channel_options(settings.max_message_bytes)
        self.status_channels = {name: aio.insecure_channel(t, options=plain) for name, t in self.targets.items()}
        self.classify = classify_pb2_grpc.ClassifyServiceStub(self.channels["classify"])
        self.restore = restore_pb2_grpc.RestoreServiceStub(self.channels["restore"])
        self.generate = generate_pb2_grpc.GenerateServiceStub(self.channels["generate"])

    async def close(self) -> None:
        for channel in [*self.channels.values(), *self.status_channels.values()]:
            await channel.close()


@dataclass
class StreamJob:
    """A running GenerateStream call that the Stop route may cancel."""

    call: Any
    stopped: bool = False


@dataclass
class Console:
    """Everything the handlers share: settings, channels, metrics and the running streams."""

    settings: ConsoleSettings
    metrics: ConsoleMetrics
    backends: Backends | None = None
    streams: dict[str, StreamJob] = field(default_factory=dict)

    @property
    def services(self) -> Backends:
        assert self.backends is not None, "channels are opened when the app starts"
        return self.backends


CONSOLE = web.AppKey("console", Console)


# ----------------------------------------------------------------------------------------------
# Request parsing. Problems are InvalidInput naming the field, answered with 400.


async def read_form(request: web.Request) -> dict[str, Any]:
    """The multipart (or urlencoded) fields of ``request``."""
    if request.content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise InvalidInput("body", f"must be multipart/form-data with an image file, got {request.content_type!r}")
    return dict(await request.post())


def form_file(form: dict[str, Any], name: str) -> bytes:
    """The bytes of a required uploaded file field."""
    data = optional_file(form, name)
    if data is None:
        raise InvalidInput(name, "missing: attach an image file")
    return data


def optional_file(form: dict[str, Any], name: str) -> bytes | None:
    """The bytes of an uploaded file field; None when it is absent or an empty text field."""
    value = form.get(name)
    if value is None or (isinstance(value, str) and not value):
        return None
    if not isinstance(value, web.FileField):
        raise InvalidInput(name, "must be a file upload, not a text field")
    data: bytes = value.file.read()
    if not data:
        raise InvalidInput(name, "the uploaded file is empty")
    return data


def parse_int(name: str, value: Any, low: int, high: int) -> int:
    """An integer in [low, high] from a JSON number or a form string."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise InvalidInput(name, f"must be an integer, got {value[:32]!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(name, f"must be an integer, got {shorten(value, 32)}")
    if not low <= value <= high:
        raise InvalidInput(name, f"{value} is out of range ({low}..{high})")
    return value


def parse_float(name: str, value: Any, low: float, high: float) -> float:
    """A finite number in [low, high] from a JSON number or a form string."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InvalidInput(name, f"must be a number, got {value[:32]!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(name, f"must be a finite number, got {shorten(value, 32)}")
    if not low <= value <= high:
        raise InvalidInput(name, f"{value} is out of range ({low:g}..{high:g})")
    return float(value)


def optional(fields: dict[str, Any], name: str) -> Any:
    """A field's value, or None when it is absent, null or an empty string (an empty form input)."""
    value = fields.get(name)
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput("body", f"is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidInput("body", "must be a JSON object")
    return body


def generate_request(body: dict[str, Any], output: str, preview: bool) -> generate_pb2.GenerateRequest:
    """A GenerateRequest built by the CLI's own builder. Only types and what protobuf can hold are
    checked here; the service checks its limits (count, steps, guidance) and names them."""
    model = body.get("model", "gan")
    if model not in ("gan", "diffusion"):
        raise InvalidInput("model", f"must be 'gan' or 'diffusion', got {json.dumps(model)[:32]}")
    sampler = body.get("sampler", "ddim")
    if sampler not in ("ddim", "ddpm"):
        raise InvalidInput("sampler", f"must be 'ddim' or 'ddpm', got {json.dumps(sampler)[:32]}")
    labels: list[int] = []
    if optional(body, "label") is not None:
        labels = [parse_int("label", body["label"], 0, INT32_MAX)]
    elif optional(body, "labels") is not None:
        if not isinstance(body["labels"], list):
            raise InvalidInput("labels", "must be a list of class ids")
        labels = [parse_int(f"labels[{i}]", v, 0, INT32_MAX) for i, v in enumerate(body["labels"])]
    seed = optional(body, "seed")
    guidance = optional(body, "guidance_scale")
    return GenerateClient.request(
        model=model,
        count=parse_int("count", body.get("count", 16), 0, UINT32_MAX),
        labels=labels,
        seed=None if seed is None else parse_int("seed", seed, 0, INT64_MAX),
        output=output,
        sampler=sampler,
        steps=parse_int("steps", optional(body, "steps") or 0, 0, UINT32_MAX),
        eta=parse_float("eta", optional(body, "eta") or 0.0, -math.inf, math.inf),
        guidance_scale=None if guidance is None else parse_float("guidance_scale", guidance, -math.inf, math.inf),
        preview_every=parse_int("preview_every", optional(body, "preview_every") or 0, 0, UINT32_MAX) if preview else 0,
    )


def data_url(png: bytes) -> str:
    """PNG bytes as a data: URL the page can show without another request."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def result_json(reply: generate_pb2.GenerateResponse) -> dict[str, Any]:
    """A GenerateResponse (grid output) as the page shows it."""
    return {
        "grid": data_url(reply.grid_png),
        "labels": list(reply.labels),
        "seed": str(reply.seed),  # uint64: JavaScript numbers would round it
        "model": reply.model_name,
        "version": reply.model_version,
    }


# ----------------------------------------------------------------------------------------------
# Handlers.


async def index(request: web.Request) -> web.FileResponse:
    """GET /: the page."""
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: the console process answers (the services' health is /api/status)."""
    return web.json_response({"ok": True})


async def examples(request: web.Request) -> web.Response:
    """GET /api/examples: the shipped example images."""
    files = sorted((STATIC / "examples").glob("*.png"))
    return web.json_response({"examples": [{"name": f.stem, "url": f"/static/examples/{f.name}"} for f in files]})


async def service_status(console: Console, name: str) -> dict[str, Any]:
    """Health (grpc.health.v1) and served models (OIP ModelStatistics, then ModelReady per model)."""
    services = console.services
    channel = services.status_channels[name]
    timeout = console.settings.status_timeout_s
    status: dict[str, Any] = {"name": name, "target": services.targets[name], "health": None, "models": []}
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except aio.AioRpcError as exc:
        status.update(health=exc.code().name, error=exc.details())
        return status
    status["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    oip = oip_grpc.GRPCInferenceServiceStub(channel)
    try:
        stats = await oip.ModelStatistics(oip_pb2.ModelStatisticsRequest(), timeout=timeout)
        models = [(s.name, s.version) for s in stats.model_stats]
        ready = await asyncio.gather(
            *(oip.ModelReady(oip_pb2.ModelReadyRequest(name=n, version=v), timeout=timeout) for n, v in models)
        )
    except aio.AioRpcError as exc:
        status["error"] = f"model status: {exc.code().name}: {exc.details()}"
        return status
    status["models"] = [{"name": n, "version": v, "ready": r.ready} for (n, v), r in zip(models, ready, strict=True)]
    return status


async def status(request: web.Request) -> web.Response:
    """GET /api/status: every service's health and models, asked concurrently."""
    console = request.app[CONSOLE]
    services = await asyncio.gather(*(service_status(console, name) for name in SERVICE_NAMES))
    return web.json_response({"services": services, "time": time.time()})


async def classify(request: web.Request) -> web.Response:
    """POST /api/classify: one uploaded image -> top classes, OOD score and flag."""
    console = request.app[CONSOLE]
    form = await read_form(request)
    image = form_file(form, "image")
    top_k = optional(form, "top_k")
    version = optional(form, "model_version")
    message = classify_pb2.ClassifyRequest(
        images=[image],
        top_k=0 if top_k is None else parse_int("top_k", top_k, 0, UINT32_MAX),
        model_version=0 if version is None else parse_int("model_version", version, 0, INT64_MAX),
    )
    reply = await call("classify", console.services.classify.Classify(message, timeout=console.settings.timeout_s))
    result = reply.classifications[0]
    return web.json_response(
        {
            "model": reply.model_name,
            "version": reply.model_version,
            "predictions": [
                {"class_id": p.class_id, "label": p.label, "probability": p.probability} for p in result.predictions
            ],
            "ood_score": result.ood_score,
            "out_of_distribution": result.out_of_distribution,
        }
    )


def damage(image: bytes, mask: bytes | None, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image as the model sees it (the services' own conversion), damaged with Gaussian noise of
    standard deviation ``noise`` and white pixels where the mask is drawn. Returns (clean, damaged, mask)."""
    clean = decode_image(image, "image")
    holes = np.zeros_like(clean)
    if mask is not None:
        # The page draws the mask white on black; no inversion, or an all-white mask would vanish.
        holes = (decode_image(mask, "mask", invert_light_background=False) > 0.5).astype(np.float32)
    damaged = clean
    if noise > 0:
        noisy = clean + np.random.default_rng(seed).normal(0.0, noise, clean.shape)
        damaged = np.clip(noisy, 0.0, 1.0).astype(np.float32)
    damaged = np.where(holes > 0, np.float32(DAMAGE_VALUE), damaged).astype(np.float32)
    return clean, damaged, holes


async def restore(request: web.Request) -> web.Response:
    """POST /api/restore: one image, damaged here as asked (noise, mask), restored by the service."""
    console = request.app[CONSOLE]
    form = await read_form(request)
    image = form_file(form, "image")
    mask = optional_file(form, "mask")
    noise = optional(form, "noise")
    sigma = 0.0 if noise is None else parse_float("noise", noise, 0.0, 1.0)
    seed_value = optional(form, "seed")
    seed = secrets.randbits(63) if seed_value is None else parse_int("seed", seed_value, 0, INT64_MAX)
    version = optional(form, "model_version")
    # Decoding runs off the event loop, as in the services.
    clean, damaged, holes = await asyncio.to_thread(damage, image, mask, sigma, seed)
    message = restore_pb2.RestoreRequest(
        output=restore_pb2.RESTORE_OUTPUT_PNG,
        model_version=0 if version is None else parse_int("model_version", version, 0, INT64_MAX),
    )
    message.tensor.CopyFrom(tensor_message(damaged[None]))
    if holes.any():
        message.mask_tensor.CopyFrom(tensor_message(holes[None]))
    reply = await call("restore", console.services.restore.Restore(message, timeout=console.settings.timeout_s))
    result = reply.restorations[0]
    return web.json_response(
        {
            "model": reply.model_name,
            "version": reply.model_version,
            "input": data_url(encode_png(clean)),
            "damaged": data_url(encode_png(damaged)),
            "restored": data_url(result.png),
            "anomaly_score": result.anomaly_score,
            "anomalous": result.anomalous,
            "noise": sigma,
            "seed": str(seed),
            "masked_pixels": int(holes.sum()),
        }
    )


async def generate(request: web.Request) -> web.Response:
    """POST /api/generate: one grid from the GAN or the diffusion model, in one reply."""
    console = request.app[CONSOLE]
    message = generate_request(await read_json(request), "grid", preview=False)
    timeout = console.settings.timeout_s
    reply = await call("generate", console.services.generate.Generate(message, timeout=timeout))
    return web.json_response(result_json(reply))


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def generate_stream(request: web.Request) -> web.StreamResponse:
    """Relay GenerateStream as Server-Sent Events: started {id}, progress {step, total, preview},
    then result, error {error, code, status} or stopped.

    Errors before the first event (bad parameters, a service that is down) are plain JSON errors
    with their HTTP status. The gRPC call is cancelled when the Stop route is called, when the
    client disconnects (aiohttp cancels the handler) or when the console shuts down.
    """
    console = request.app[CONSOLE]
    metrics = console.metrics
    message = generate_request(await read_json(request), "grid", preview=True)
    grpc_call = console.services.generate.GenerateStream(message, timeout=console.settings.stream_timeout_s)
    job_id = secrets.token_hex(8)
    job = StreamJob(grpc_call)
    console.streams[job_id] = job
    metrics.streams_in_flight.inc()
    outcome = "disconnected"
    counted = False

    def count() -> None:
        nonlocal counted
        if not counted:
            counted = True
            metrics.streams_in_flight.dec()
            metrics.streams.labels(outcome).inc()

    try:
        try:
            event = await call("generate", grpc_call.read())
        except ServiceError:
            outcome = "failed"
            raise
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        await response.write(sse("started", {"id": job_id}))
        try:
            while event is not aio.EOF:
                if event.HasField("progress"):
                    p = event.progress
                    preview = data_url(p.preview_png) if p.preview_png else None
                    await response.write(sse("progress", {"step": p.step, "total": p.total_steps, "preview": preview}))
                else:
                    await response.write(sse("result", result_json(event.result)))
                event = await call("generate", grpc_call.read())
            outcome = "completed"
        except ServiceError as exc:
            outcome = "failed"
            await response.write(sse("error", {**exc.body(), "status": exc.status}))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not job.stopped or (task is not None and task.cancelling()):
                raise  # the client went away or the console is stopping
            # The Stop route cancelled the gRPC call; tell the page, then end the stream.
            outcome = "stopped"
            await response.write(sse("stopped", {"id": job_id}))
        # Counted before the stream ends: a page (or a test) that reads the metrics as soon as it
        # has the end of the stream must find this one there.
        count()
        await response.write_eof()
        return response
    finally:
        console.streams.pop(job_id, None)
        grpc_call.cancel()  # no-op once the call has finished
        count()


async def stop_stream(request: web.Request) -> web.Response:
    """POST /api/generate/stop/{id}: cancel that stream's GenerateStream call on the service."""
    console = request.app[CONSOLE]
    job_id = request.match_info["id"]
    job = console.streams.get(job_id)
    if job is None:
        raise web.HTTPNotFound(text=f"id: no running generation {job_id[:32]!r} (finished or already stopped)")
    job.stopped = True
    job.call.cancel()
    return web.json_response({"stopped": job_id})


# ----------------------------------------------------------------------------------------------
# The application.


def error_json(status: int, message: str, **extra: Any) -> web.Response:
    """The JSON error body every failure answers with."""
    return web.json_response({"error": message, **extra}, status=status)


def route_of(request: web.Request) -> str:
    """A bounded label for the metrics: the route's pattern, not the requested path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def errors_and_metrics(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure answers JSON {"error": ...}; every answer is counted by route and status."""
    console = request.app[CONSOLE]
    started = time.perf_counter()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except ServiceError as exc:
        response = error_json(exc.status, str(exc), code=exc.code.name, service=exc.service)
    except InvalidInput as exc:
        response = error_json(400, str(exc))
    except web.HTTPRequestEntityTooLarge:
        limit = console.settings.max_upload_bytes
        response = error_json(413, f"body: larger than the limit of {limit} bytes (max_upload_bytes)")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_json(exc.status, exc.text if exc.text and exc.text != exc.reason else exc.reason)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        response = error_json(500, "internal error in the console (logged)")
    route = route_of(request)
    console.metrics.requests.labels(route, str(response.status)).inc()
    console.metrics.duration.labels(route).observe(time.perf_counter() - started)
    return response


def build_app(settings: ConsoleSettings, registry: CollectorRegistry | None = None) -> web.Application:
    """The console's aiohttp application; gRPC channels open on startup and close on cleanup."""
    console = Console(settings, ConsoleMetrics(registry or CollectorRegistry()))
    app = web.Application(middlewares=[errors_and_metrics], client_max_size=settings.max_upload_bytes)
    app[CONSOLE] = console

    async def channels(app: web.Application) -> Any:
        console.backends = Backends(settings)  # grpc.aio channels belong to the running loop
        yield
        for job in list(console.streams.values()):
            job.call.cancel()
        await console.backends.close()

    app.cleanup_ctx.append(channels)
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/examples", examples)
    app.router.add_post("/api/classify", classify)
    app.router.add_post("/api/restore", restore)
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/generate/stream", generate_stream)
    app.router.add_post("/api/generate/stop/{id}", stop_stream)
    app.router.add_static("/static", STATIC)
    return app
