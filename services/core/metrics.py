"""Every Prometheus metric nnserve exports, built against an injected registry.

Names follow ``nnserve_<subsystem>_<name>_<unit>``; labels are bounded. gRPC series are labelled as
the common gRPC instrumentations label theirs (go-grpc-prometheus, grpc-ecosystem's
py-grpc-prometheus): ``grpc_type``, ``grpc_service``, ``grpc_method``, ``grpc_code``; per-model
series carry ``model`` and ``version``, so the two versions of a model stay apart during a reload.
Duration buckets span a 1 ms classify call and a 10 s diffusion request.

No ``*_created`` series: prometheus_client would add one per counter and histogram child, doubling
the series count for a timestamp no dashboard reads (and one that cannot be merged across workers).

The series updated on every call (request counts and latencies, queue waits, batch sizes, model
calls) are :class:`HotFamily` collectors rather than prometheus_client metrics: plain numbers that
the event loop thread, their only writer, updates without a lock, turned into samples when
scraped. A prometheus_client histogram takes a lock per bucket and per sum and scans its buckets
in Python; the dozen updates a call makes cost more than the rest of the call's bookkeeping.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

# A process-wide switch in prometheus_client; every registry of the process is built after this import.
disable_created_metrics()

# Label values of calls to methods no servicer registered: one series, whatever the path.
UNKNOWN = "unknown"
# gRPC services whose calls are counted but kept out of the latency histogram and the in-flight
# gauge: health checks are not the service's work, and Watch and reflection streams last as long as
# their client's connection, so their "latency" would swamp every percentile.
UNTIMED_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)

DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _HotCounter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class _HotGauge(_HotCounter):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class _HotHistogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.sum += value


class HotFamily(Collector):
    """A counter, gauge or histogram family with prometheus_client's ``labels(...).inc/observe``
    interface, for series updated on every call from the event loop thread (their only writer).

    Scrapes, from the metrics thread, read a snapshot: a histogram's count is the sum of the
    buckets it read, so the +Inf bucket and ``_count`` always agree.
    """

    def __init__(
        self,
        kind: str,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float] = (),
    ) -> None:
        if kind not in ("counter", "gauge", "histogram"):
            raise ValueError(kind)
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(float(b) for b in buckets)
        self._children: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def labels(self, *values: Any, **named: Any) -> Any:
        """The child for these label values (positional, or all by name), made on first use."""
        if named:
            values = tuple(named[label] for label in self.labelnames)
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, got {key}")
        child = self._children.get(key)
        if child is None:
            if self.kind == "histogram":
                child = _HotHistogram(self.buckets)
            else:
                child = _HotCounter() if self.kind == "counter" else _HotGauge()
            self._children[key] = child
        return child

    def _family(self) -> Metric:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if self.kind == "gauge":
            return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for key, child in list(self._children.items()):
            if self.kind != "histogram":
                family.add_metric(list(key), child.value)  # type: ignore[attr-defined]
                continue
            counts, total, running = list(child.counts), child.sum, 0
            buckets = []
            for bound, count in zip((*self.buckets, float("inf")), counts, strict=True):
                running += count
                buckets.append((floatToGoString(bound), running))
            family.add_metric(list(key), buckets, total)  # type: ignore[attr-defined]
        yield family


class Metrics:
    """The metric families of one service process."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.registry = registry
        self.service = service
        self.requests = HotFamily(
            "counter",
            "nnserve_grpc_requests_total",
            "gRPC calls handled, by final status code (health and reflection included; methods no servicer "
            "registered as grpc_service and grpc_method 'unknown').",
            ["service", "grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            registry,
        )
        self.request_duration = HotFamily(
            "histogram",
            "nnserve_grpc_request_duration_seconds",
            "Time from receiving a gRPC call to its reply (health and reflection calls are not observed).",
            ["service", "grpc_type", "grpc_service", "grpc_method"],
            registry,
            buckets=DURATION_BUCKETS,
        )
        self.in_flight = HotFamily(
            "gauge",
            "nnserve_grpc_requests_in_flight",
            "gRPC calls being handled now (health and reflection calls are not counted).",
            ["service"],
            registry,
        )
        self.http_requests = HotFamily(
            "counter",
            "nnserve_http_requests_total",
            "HTTP requests handled, by route template (METHOD /path/{param}, or unknown) and HTTP status.",
            ["service", "route", "code"],
            registry,
        )
        self.http_request_duration = HotFamily(
            "histogram",
            "nnserve_http_request_duration_seconds",
            "Time from receiving an HTTP request to its reply (to its last event, for a stream); "
            "health probes are not observed.",
            ["service", "route"],
            registry,
            buckets=DURATION_BUCKETS,
        )
        self.http_in_flight = HotFamily(
            "gauge",
            "nnserve_http_requests_in_flight",
            "HTTP requests being handled now.",
            ["service"],
            registry,
        )
        self.queue_wait = HotFamily(
            "histogram",
            "nnserve_batch_queue_wait_seconds",
            "Time a request waited in the batcher's queue.",
            ["service", "model", "version"],
            registry,
            buckets=DURATION_BUCKETS,
        )
        self.inference_duration = HotFamily(
            "histogram",
            "nnserve_model_inference_duration_seconds",
            "Duration of one model call (one batch).",
            ["service", "model", "version"],
            registry,
            buckets=DURATION_BUCKETS,
        )
        self.batch_size = HotFamily(
            "histogram",
            "nnserve_batch_size_rows",
            "Rows (images or samples) per model call.",
            ["service", "model", "version"],
            registry,
            buckets=BATCH_BUCKETS,
        )
        self.queue_depth = Gauge(
            "nnserve_batch_queue_depth_requests",
            "Requests waiting in the batcher's queue.",
            ["service", "model", "version"],
            registry=registry,
        )
        self.rows = HotFamily(
            "counter",
            "nnserve_model_inference_rows_total",
            "Rows (images or samples) run through the model.",
            ["service", "model", "version"],
            registry,
        )
        self.batches = HotFamily(
            "counter",
            "nnserve_model_executions_total",
            "Model calls (batches) executed.",
            ["service", "model", "version"],
            registry,
        )
        self.failures = Counter(
            "nnserve_model_failures_total",
            "Model calls that raised.",
            ["service", "model", "version"],
            registry=registry,
        )
        self.rejected = Counter(
            "nnserve_batch_rejected_total",
            "Requests refused or dropped by the batcher, by reason.",
            ["service", "model", "version", "reason"],
            registry=registry,
        )
        self.isolations = Counter(
            "nnserve_batch_isolations_total",
            "Merged model calls that failed and were re-run request by request, so that only the culprit fails.",
            ["service", "model", "version"],
            registry=registry,
        )
        self.reloads = Counter(
            "nnserve_model_reloads_total",
            "Model version reloads, by result (loaded or rejected) and the version tried.",
            ["service", "model", "version", "result"],
            registry=registry,
        )
        self.model_info = Gauge(
            "nnserve_model_info",
            "The model version being served (value 1), its execution provider and precision (fp32, int8).",
            ["service", "model", "version", "provider", "precision"],
            registry=registry,
        )

    def for_model(self, model: str, version: int | str) -> ModelMetrics:
        """Children bound to this service, ``model`` and ``version``, for the batcher's hot path."""
        labels = {"service": self.service, "model": model, "version": str(version)}
        return ModelMetrics(
            queue_wait=self.queue_wait.labels(**labels),
            inference_duration=self.inference_duration.labels(**labels),
            batch_size=self.batch_size.labels(**labels),
            queue_depth=self.queue_depth.labels(**labels),
            rows=self.rows.labels(**labels),
            batches=self.batches.labels(**labels),
            failures=self.failures.labels(**labels),
            isolations=self.isolations.labels(**labels),
            queue_full=self.rejected.labels(reason="queue_full", **labels),
            deadline=self.rejected.labels(reason="deadline_exceeded", **labels),
            cancelled=self.rejected.labels(reason="cancelled", **labels),
            model=model,
            version=str(version),
        )


@dataclass(frozen=True)
class ModelMetrics:
    """Metric children for one model; see :meth:`Metrics.for_model`."""

    queue_wait: Any
    inference_duration: Any
    batch_size: Any
    queue_depth: Any
    rows: Any
    batches: Any
    failures: Any
    isolations: Any
    queue_full: Any
    deadline: Any
    cancelled: Any
    model: str = ""
    version: str = ""


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[Any, Thread]:
    """Start the metrics endpoint in a daemon thread; returns (server, thread).

    Only ``/metrics`` answers (prometheus_client's own server answers every path with the metrics,
    so an HTTP health probe pointed at this port would always pass); anything else is 404.
    """
    server = ThreadingHTTPServer((host, port), _metrics_handler(registry))
    server.daemon_threads = True
    thread = Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server, thread


def _metrics_handler(registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class MetricsHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if urlsplit(self.path).path != "/metrics":
                self._reply(404, b"not found: metrics are at /metrics\n", "text/plain; charset=utf-8")
                return
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, encoder(registry), content_type)

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line
            pass

    return MetricsHandler
