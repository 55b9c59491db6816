"""``python -m services.console`` (or ``nnserve serve console``): the web console and its gateway."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from services.console.app import build_app
from services.console.settings import ConsoleSettings
from services.core.entrypoint import configure_logging
from services.core.metrics import serve_metrics
from services.core.settings import add_settings_arguments, settings_from_args

log = logging.getLogger(__name__)


async def serve(settings: ConsoleSettings, port_file: Path | None = None) -> int:
    """Serve the console until SIGTERM or SIGINT; returns the exit code."""
    registry = CollectorRegistry()
    metrics_port = None
    if settings.metrics_port is not None:
        metrics_server, _ = serve_metrics(registry, settings.metrics_host, settings.metrics_port)
        metrics_port = metrics_server.server_port
    # handler_cancellation: a page that goes away (Stop, a closed tab) cancels its handler, and with
    # it the gRPC call it was relaying, so the generate service stops sampling for nobody.
    runner = web.AppRunner(
        build_app(settings, registry), handler_cancellation=True, shutdown_timeout=settings.shutdown_timeout_s
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = runner.addresses[0][1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "console on http://%s:%d/ calling classify %s, restore %s, generate %s (metrics: %s)",
        settings.host,
        port,
        settings.classify_target,
        settings.restore_target,
        settings.generate_target,
        f"http://{settings.metrics_host}:{metrics_port}/metrics" if metrics_port else "off",
    )
    if port_file is not None:
        # The same shape the services write, so `nnserve up` and the tests read it alike.
        info = {"service": "console", "host": settings.host, "port": port, "metrics_port": metrics_port, "models": {}}
        tmp = port_file.with_suffix(port_file.suffix + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(port_file)
    await stop.wait()
    log.info("console: shutting down")
    await runner.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnserve serve console",
        description="Run the nnserve web console: one page that calls the classify, restore and generate services.",
    )
    # The shared helpers only read model_config and model_fields, which every BaseSettings has.
    add_settings_arguments(parser, ConsoleSettings)  # type: ignore[arg-type]
    parser.add_argument("--port-file", type=Path, default=None, help="write the bound ports as JSON here once serving")
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(ConsoleSettings, args)  # type: ignore[type-var]
    except ValidationError as exc:
        parser.error(str(exc))
    configure_logging(settings.log_level)
    return asyncio.run(serve(settings, args.port_file))


if __name__ == "__main__":
    raise SystemExit(main())
