"""The entry point every service shares: parse settings once, build the service, serve it.

A model that cannot be loaded, or settings that cannot work, end the process with exit code 2 and
one line naming the problem.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from services.core import errors, logs, tracing
from services.core.credentials import bearer_token, server_credentials
from services.core.eventloop import loop_factory
from services.core.lifecycle import serve
from services.core.server import Service
from services.core.settings import S, add_settings_arguments, settings_from_args
from services.core.workers import supervise

log = logging.getLogger(__name__)


def release_large_buffers() -> None:
    """Have glibc hand buffers over 128 KiB straight back to the OS when they are freed.

    By default glibc raises that threshold after freeing a large block, so decoded images and
    batches come from the heap afterwards and the process keeps their peak (with several decode
    threads, ~20 MiB more after a few big images, for good). A fixed threshold keeps RSS near its
    steady level whatever clients send. Not glibc: nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def configure_logging(level: str, fmt: str = "text", access_log: bool = False) -> None:
    """The process's log level, format (text or json) and access log (see services.core.logs)."""
    logs.configure(level, "json" if fmt == "json" else "text", access_log)


def main(
    prog: str,
    settings_cls: type[S],
    build: Callable[[S], Service],
    argv: Sequence[str] | None = None,
) -> int:
    """Entry point shared by every service: parse settings once, build, serve.

    A model that cannot be loaded ends the process with exit code 2 and one line naming the file.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=f"Run the nnserve {settings_cls.__name__.removesuffix('Settings').lower()} gRPC service."
    )
    add_settings_arguments(parser, settings_cls)
    parser.add_argument("--port-file", type=Path, default=None, help="write the bound ports as JSON here once SERVING")
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(settings_cls, args)
    except ValidationError as exc:
        parser.error(str(exc))
    configure_logging(settings.log_level, settings.log_format, settings.access_log)
    release_large_buffers()
    try:
        server_credentials(settings)
        bearer_token(settings)
    except errors.ConfigError as exc:
        return _cannot_start(prog, exc)

    def run_worker(worker_settings: S, port_file: Path | None) -> int:
        try:
            if worker_settings.tracing:  # in each worker: the exporter's thread does not survive a fork
                tracing.configure(settings_cls.service or prog)
            factory = loop_factory(worker_settings.event_loop)
            service = build(worker_settings)
        except (errors.ModelNotFound, errors.ModelLoadError, errors.ConfigError) as exc:
            return _cannot_start(prog, exc)
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                return runner.run(serve(service, worker_settings, port_file))
        except RuntimeError as exc:  # grpc's add_insecure_port/add_secure_port: "Failed to bind to address A; ..."
            if not str(exc).startswith("Failed to bind"):
                raise
            address = str(exc).split(";")[0].removeprefix("Failed to bind to address ")
            return _cannot_start(prog, errors.ConfigError(f"cannot listen on {address}: in use or not available"))
        except OSError as exc:  # the metrics or HTTP port
            if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                raise
            http = getattr(worker_settings, "http_port", None)
            ports = f"metrics_port {worker_settings.metrics_port}, http_port {http}"
            return _cannot_start(prog, errors.ConfigError(f"cannot listen: {exc.strerror} ({ports})"))
        finally:
            tracing.shutdown()  # flushes the spans still buffered

    if settings.workers > 1:
        # Fork before anything is loaded: no gRPC, onnxruntime or event loop exists yet to copy.
        return supervise(settings, run_worker, args.port_file)  # type: ignore[arg-type]
    return run_worker(settings, args.port_file)


def _cannot_start(prog: str, exc: Exception) -> int:
    log.error("cannot start: %s", exc)
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2
