"""OpenTelemetry tracing: optional (the ``tracing`` extra) and off unless the ``tracing`` setting is on.

With tracing on, every gRPC call (and HTTP request) gets a SERVER span that continues the caller's
W3C ``traceparent``, named and attributed by the RPC semantic conventions (``rpc.system``,
``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``) plus the model and version it ran on;
a request that runs through the dynamic batcher gets child spans for its ``queue_wait``, the
``batch`` it ran in and, inside that, the ``inference`` (the onnxruntime call), with the batch's
rows and requests as attributes; a sampling job in the step batcher gets its ``queue_wait`` and a
``sampling`` span (admission to its end) with its rows and the steps it ran.

The exporter is OTLP over gRPC, configured as every OpenTelemetry SDK is, by the standard
environment variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_BSP_*``, ``OTEL_PROPAGATORS``): the SDK reads them itself.

Off, nothing here runs: the hot path tests the module flag :data:`enabled` (one branch) and
allocates nothing. The batcher's spans are made after the fact from the times it already takes,
since one model call serves several requests' traces.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from services.core.errors import ConfigError

# Whether this process traces; read on the hot path, so a plain module global.
enabled = False
_tracer: Any = None
_provider: Any = None

# Span names of the batcher's child spans.
QUEUE_WAIT = "queue_wait"
BATCH = "batch"
INFERENCE = "inference"
SAMPLING = "sampling"  # an iterative job's (diffusion sampling's) time in the step batcher

# Attribute keys (nnserve's own; the rpc.* ones are the semantic conventions').
MODEL = "nnserve.model.name"
VERSION = "nnserve.model.version"
BATCH_ROWS = "nnserve.batch.size"
BATCH_REQUESTS = "nnserve.batch.requests"
REQUEST_ROWS = "nnserve.request.rows"
REQUEST_ID = "nnserve.request_id"

# gRPC codes that are the server's fault: the span's status is ERROR for these only, as the RPC
# semantic conventions ask of a server (a client's INVALID_ARGUMENT is not the server failing).
SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})


def configure(service: str, provider: Any = None) -> None:
    """Turn tracing on for this process.

    ``provider`` is an SDK ``TracerProvider`` (tests pass one with an in-memory exporter); by
    default one is built with the OTLP exporter and the OTEL_* environment's sampler and resource,
    the service name defaulting to ``nnserve-<service>``. Call it in each serving process (after
    any fork: the span processor's thread does not survive one). Raises ConfigError without the
    ``tracing`` extra.
    """
    global enabled, _tracer, _provider
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError("tracing is on but OpenTelemetry is missing: pip install 'nnserve[tracing]'") from None
    if provider is None:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError(
                "tracing is on but the OTLP exporter is missing: pip install 'nnserve[tracing]'"
            ) from None
        resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": f"nnserve-{service}"}))
        provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider = provider
    _tracer = trace.get_tracer("nnserve", tracer_provider=provider)
    enabled = True


def shutdown() -> None:
    """Turn tracing off and flush what the provider still holds (at exit, and between tests)."""
    global enabled, _tracer, _provider
    enabled = False
    _tracer = None
    provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


def server_span(name: str, metadata: Iterable[tuple[str, Any]] | None, attributes: Mapping[str, Any]) -> Any:
    """Start the SERVER span of a call, as a child of the caller's ``traceparent`` (gRPC metadata or
    HTTP headers, lower-case keys), and make it current; returns the handle :func:`end_server_span` takes."""
    from opentelemetry import context, propagate, trace

    carrier = {key: value for key, value in metadata or () if key in ("traceparent", "tracestate", "baggage")}
    parent = propagate.extract(carrier)
    span = _tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes)
    token = context.attach(trace.set_span_in_context(span, parent))
    return span, token


def end_server_span(handle: Any, error: bool, attributes: Mapping[str, Any]) -> None:
    """End a span from :func:`server_span` with the call's outcome: ``error`` (the server's fault)
    sets its status to ERROR; ``attributes`` (None or empty values skipped) are added."""
    from opentelemetry import context
    from opentelemetry.trace import Status, StatusCode

    span, token = handle
    for key, value in attributes.items():
        if value is not None and value != "":
            span.set_attribute(key, value)
    if error:
        span.set_status(Status(StatusCode.ERROR))
    span.end()
    try:
        context.detach(token)
    except ValueError:  # a stream's generator closed in another context: the span is ended all the same
        pass


def capture() -> Any:
    """The current context, for a request about to wait in a queue (its spans are made later)."""
    from opentelemetry import context

    return context.get_current()


class _Queued:
    """A queued request's trace context and the moment its wait ended."""

    __slots__ = ("context", "waited_until")

    def __init__(self, context: Any, waited_until: float) -> None:
        self.context = context
        self.waited_until = waited_until


def _clock() -> int:
    """Nanoseconds to add to ``perf_counter() * 1e9`` for the wall-clock time spans take."""
    return time.time_ns() - int(time.perf_counter() * 1e9)


def _labels(name: str, metrics: Any) -> dict[str, Any]:
    version = getattr(metrics, "version", "")
    return {MODEL: name, VERSION: version} if version else {MODEL: name}


def queued(name: str, metrics: Any, requests: Sequence[Any], started: float) -> None:
    """Queue-wait spans for the requests of a batch about to run (``started``, a perf_counter
    instant); each request's ``trace`` (from :func:`capture`) is kept for :func:`ran`."""
    offset = _clock()
    labels = _labels(name, metrics)
    for request in requests:
        ctx = request.trace
        if ctx is None:
            continue
        span = _tracer.start_span(QUEUE_WAIT, context=ctx, start_time=offset + int(request.enqueued * 1e9))
        span.set_attributes(labels)
        span.end(end_time=offset + int(started * 1e9))
        request.trace = _Queued(ctx, started)


def ran(
    name: str,
    metrics: Any,
    requests: Sequence[Any],
    rows: int,
    predict_started: float,
    predict_finished: float,
    error: BaseException | None = None,
) -> None:
    """``batch`` and ``inference`` spans for each traced request of one model call, and the batch's
    facts on each request's server span."""
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    offset = _clock()
    ended = time.perf_counter()
    labels = _labels(name, metrics)
    facts = {**labels, BATCH_ROWS: rows, BATCH_REQUESTS: len(requests)}
    for request in requests:
        queued_ = request.trace
        if queued_ is None:
            continue
        ctx, began = (queued_.context, queued_.waited_until) if isinstance(queued_, _Queued) else (queued_, None)
        parent = trace.get_current_span(ctx)
        if parent.is_recording():  # not when the call ended first (cancelled while its batch ran)
            parent.set_attributes(facts)
        start = offset + int((predict_started if began is None else began) * 1e9)
        batch = _tracer.start_span(BATCH, context=ctx, start_time=start, attributes=facts)
        batch.set_attribute(REQUEST_ROWS, request.rows)
        inference = _tracer.start_span(
            INFERENCE,
            context=trace.set_span_in_context(batch, ctx),
            start_time=offset + int(predict_started * 1e9),
            attributes=labels,
        )
        if error is not None:
            inference.record_exception(error)
            inference.set_status(Status(StatusCode.ERROR, type(error).__name__))
            batch.set_status(Status(StatusCode.ERROR, type(error).__name__))
        inference.end(end_time=offset + int(predict_finished * 1e9))
        batch.end(end_time=offset + int(ended * 1e9))


class _Inline:
    """Stands in for a queued request on the inline path (it runs in the caller's own context)."""

    __slots__ = ("trace", "rows")

    def __init__(self, rows: int) -> None:
        self.trace = capture()
        self.rows = rows


def ran_inline(name: str, metrics: Any, rows: int, started: float, finished: float) -> None:
    """``batch`` and ``inference`` spans of a request that ran at once, with no queue wait."""
    ran(name, metrics, [_Inline(rows)], rows, started, finished)


def sampled(name: str, metrics: Any, entry: Any, error: BaseException | None = None) -> None:
    """The ``sampling`` span of an iterative job leaving the step batcher (done, failed or
    cancelled), from its admission (:func:`queued`) to now, and the model on its caller's span."""
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    queued_ = entry.trace
    if not isinstance(queued_, _Queued):
        return
    labels = _labels(name, metrics)
    parent = trace.get_current_span(queued_.context)
    if parent.is_recording():
        parent.set_attributes(labels)
    offset = _clock()
    span = _tracer.start_span(
        SAMPLING,
        context=queued_.context,
        start_time=offset + int(queued_.waited_until * 1e9),
        attributes={**labels, REQUEST_ROWS: entry.job.rows},
    )
    steps = getattr(entry.job, "index", None)
    if isinstance(steps, int):
        span.set_attribute("nnserve.sampling.steps", steps)
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    elif getattr(entry, "cancelled", False):
        span.set_attribute("nnserve.cancelled", True)
    span.end()
