"""A service process's life: serve until SIGTERM/SIGINT, reload on SIGHUP, report ports, drain.

:func:`serve` starts the metrics endpoint, the :class:`~services.core.server.GrpcServer` and beside it
the :class:`~services.core.http.HttpServer` (same loop, same servicers), writes
the bound ports to a file once SERVING (for supervisors and tests), and on SIGTERM or SIGINT
drains and returns 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path
from typing import Any

from services.core.http import HttpServer
from services.core.metrics import Metrics, serve_metrics
from services.core.server import GrpcServer, Service
from services.core.settings import ServiceSettings

log = logging.getLogger(__name__)


async def serve(service: Service, settings: ServiceSettings, port_file: Path | None = None) -> int:
    """Run ``service`` until SIGTERM or SIGINT; returns the process exit code."""
    metrics_port = None
    if settings.metrics_port is not None:
        metrics_server, _ = serve_metrics(service.metrics.registry, settings.metrics_host, settings.metrics_port)
        metrics_port = metrics_server.server_port
    server = GrpcServer(service, settings)
    try:
        port = await server.start()
        http_port = None
        if settings.http_port is not None:
            # Started once the models are warm (server.start), so HTTP readiness never runs ahead of gRPC's.
            http = HttpServer(service, settings, server.interceptor)
            http_port = await http.start()
            server.also_close.append(http.stop)
    except BaseException:
        await server.close_now()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = loop.create_task(server.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    log.info(
        "%s serving %s on %s:%d (HTTP: %s; metrics: %s; event loop: %s)",
        service.name,
        ", ".join(service.service_names),
        settings.host,
        port,
        f"http://{settings.http_host}:{http_port}/v2" if http_port else "off",
        f"http://{settings.metrics_host}:{metrics_port}/metrics" if metrics_port else "off",
        type(loop).__module__.split(".")[0],
    )
    if port_file is not None:
        _write_atomically(
            port_file,
            {
                "service": service.name,
                "host": settings.host,
                "port": port,
                "http_port": http_port,
                "metrics_port": metrics_port,
                "models": service.models,
            },
        )
    await stop.wait()
    log.info("%s: shutting down, in-flight calls have %.1fs to finish", service.name, settings.grace_period_s)
    await server.stop(settings.grace_period_s)
    log.info("%s: stopped; calls by method and code: %s", service.name, json.dumps(call_counts(service.metrics)))
    return 0


def call_counts(metrics: Metrics) -> dict[str, dict[str, int]]:
    """Calls handled so far, {service/method: {code: count}}, read back from the request counter."""
    counts: dict[str, dict[str, int]] = {}
    for family in metrics.requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                labels = sample.labels
                by_code = counts.setdefault(f"{labels['grpc_service']}/{labels['grpc_method']}", {})
                by_code[labels["grpc_code"]] = int(sample.value)
    return counts


def _write_atomically(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)
