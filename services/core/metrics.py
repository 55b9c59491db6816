"""Every Prometheus metric nnserve exports, built against an injected registry.

Names follow ``nnserve_<subsystem>_<name>_<unit>``; labels are bounded (service, method, code,
model). Duration buckets span a 1 ms classify call and a 10 s diffusion request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

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


class Metrics:
    """The metric families of one service process."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.registry = registry
        self.service = service
        self.requests = Counter(
            "nnserve_grpc_requests_total",
            "gRPC calls handled, by final status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "nnserve_grpc_request_duration_seconds",
            "Time from receiving a gRPC call to its reply.",
            ["service", "method"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "nnserve_grpc_requests_in_flight",
            "gRPC calls being handled now.",
            ["service"],
            registry=registry,
        )
        self.http_requests = Counter(
            "nnserve_http_requests_total",
            "HTTP requests handled, by route template (METHOD /path/{param}, or unknown) and HTTP status.",
            ["service", "route", "code"],
            registry=registry,
        )
        self.http_request_duration = Histogram(
            "nnserve_http_request_duration_seconds",
            "Time from receiving an HTTP request to its reply (to its last event, for a stream).",
            ["service", "route"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.http_in_flight = Gauge(
            "nnserve_http_requests_in_flight",
            "HTTP requests being handled now.",
            ["service"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "nnserve_batch_queue_wait_seconds",
            "Time a request waited in the batcher's queue.",
            ["service", "model"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "nnserve_model_inference_duration_seconds",
            "Duration of one model call (one batch).",
            ["service", "model"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "nnserve_batch_size_rows",
            "Rows (images or samples) per model call.",
            ["service", "model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "nnserve_batch_queue_depth_requests",
            "Requests waiting in the batcher's queue.",
            ["service", "model"],
            registry=registry,
        )
        self.rows = Counter(
            "nnserve_model_inference_rows_total",
            "Rows (images or samples) run through the model.",
            ["service", "model"],
            registry=registry,
        )
        self.batches = Counter(
            "nnserve_model_executions_total",
            "Model calls (batches) executed.",
            ["service", "model"],
            registry=registry,
        )
        self.failures = Counter(
            "nnserve_model_failures_total",
            "Model calls that raised.",
            ["service", "model"],
            registry=registry,
        )
        self.rejected = Counter(
            "nnserve_batch_rejected_total",
            "Requests refused or dropped by the batcher, by reason.",
            ["service", "model", "reason"],
            registry=registry,
        )
        self.isolations = Counter(
            "nnserve_batch_isolations_total",
            "Merged model calls that failed and were re-run request by request, so that only the culprit fails.",
            ["service", "model"],
            registry=registry,
        )
        self.reloads = Counter(
            "nnserve_model_reloads_total",
            "Model version reloads, by result (loaded or rejected).",
            ["service", "model", "result"],
            registry=registry,
        )
        self.model_info = Gauge(
            "nnserve_model_info",
            "The model version being served (value 1), its execution provider and precision (fp32, int8).",
            ["service", "model", "version", "provider", "precision"],
            registry=registry,
        )

    def for_model(self, model: str) -> ModelMetrics:
        """Children bound to this service and ``model``, for the batcher's hot path."""
        labels = {"service": self.service, "model": model}
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
