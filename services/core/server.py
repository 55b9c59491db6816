"""The grpc.aio server every service runs: error mapping, metrics, health, reflection, graceful stop.

- :class:`ServerInterceptor` maps domain errors to gRPC status codes in one place and counts every
  call in Prometheus. Unexpected exceptions become INTERNAL with a generic message and a full log
  line; client-visible messages come only from :mod:`services.core.errors`.
- :func:`run` starts a :class:`Service`, reports SERVING once its models are warm, and on SIGTERM
  or SIGINT turns health NOT_SERVING, refuses new calls, lets in-flight calls finish within the
  grace period and returns 0.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from services.core import errors
from services.core.batching import DEADLINE_SLACK_S
from services.core.metrics import Metrics, serve_metrics
from services.core.settings import S, ServiceSettings, add_settings_arguments, settings_from_args

log = logging.getLogger(__name__)

_STATUS: dict[type[errors.NnserveError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.InferenceFailed: grpc.StatusCode.INTERNAL,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}


# A status message travels in trailing metadata, which gRPC caps (8 KiB by default): longer
# messages would turn the reply into RESOURCE_EXHAUSTED. Echoed input is shortened where it is
# formatted (errors.shorten); this is the last line of defence.
MAX_MESSAGE_CHARS = 2000
# For this long before the listener closes, calls refused while draining wait for the close to be
# answered (see ServerInterceptor.refuse).
HOLD_BEFORE_CLOSE_S = 0.2
# Label value for calls to methods no servicer registered: one series, whatever the path.
UNKNOWN_METHOD = "unknown"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and client-visible message for an exception."""
    for cls in type(exc).__mro__:
        code = _STATUS.get(cls)  # type: ignore[call-overload]
        if code is not None:
            return code, _clip(str(exc))
    if isinstance(exc, errors.NnserveError):
        return grpc.StatusCode.INTERNAL, _clip(str(exc))
    return grpc.StatusCode.INTERNAL, "internal error (details are in the server log)"


def _clip(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 20] + f"...({len(message)} chars)"


class ServerInterceptor(aio.ServerInterceptor):
    """Wraps every method handler once (cached per method) with error mapping and metrics."""

    def __init__(self, metrics: Metrics, token: str | None = None, exempt: tuple[str, ...] = ()) -> None:
        self._metrics = metrics
        self._expected = f"Bearer {token}".encode() if token else None
        self._exempt = exempt
        # Set at shutdown: new calls are refused with UNAVAILABLE (health still answers) while
        # in-flight ones finish, so clients move to another replica before the listener closes.
        self.draining = False
        # Set for the last moments before the listener closes: refused calls are held, and answered
        # UNAVAILABLE only once the close has begun (see GrpcServer.stop).
        self.holding = False
        self._closing = asyncio.Event()
        # Wrapped handlers of registered methods only: a cache keyed by whatever path a client
        # sends would grow without bound.
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._counters: dict[tuple[str, str], Any] = {}
        self._unknown = grpc.unary_unary_rpc_method_handler(self._unknown_method)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return self._unknown
        wrapped = self._wrap(method.lstrip("/"), handler)
        self._handlers[method] = wrapped
        return wrapped

    async def refuse(self, context: aio.ServicerContext) -> None:
        """Answer a call that arrived while draining with UNAVAILABLE (raises).

        Close to the close, the answer waits for it: gRPC cancels (CANCELLED, not UNAVAILABLE) every
        call that reached it but not yet the application when the server shuts down, so a client
        must not have a call in transit at that moment. A closed-loop client whose call is held
        here has none; it gets UNAVAILABLE during the grace period and reconnects elsewhere.
        """
        if self.holding and not self._closing.is_set():
            remaining = context.time_remaining()
            wait = None if remaining is None else max(0.0, remaining - DEADLINE_SLACK_S)
            try:
                await asyncio.wait_for(self._closing.wait(), wait)
            except TimeoutError:
                pass
        raise errors.Unavailable("server is shutting down; retry on another replica")

    def closing(self) -> None:
        """The listener is closing: release held calls."""
        self._closing.set()

    async def _unknown_method(self, request: Any, context: aio.ServicerContext) -> Any:
        """A method no servicer registered: authenticate first, so paths cannot be probed without a token."""
        code = grpc.StatusCode.UNIMPLEMENTED
        message = "method not found on this server"
        if self._expected is not None and not self._authorized(context):
            code, message = grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"
        self._count(UNKNOWN_METHOD, code.name, 0.0)
        await context.abort(code, message)

    def _count(self, method: str, code: str, started: float) -> None:
        counter = self._counters.get((method, code))
        if counter is None:
            counter = self._metrics.requests.labels(self._metrics.service, method, code)
            self._counters[(method, code)] = counter
        counter.inc()

    def _authorized(self, context: aio.ServicerContext) -> bool:
        """Constant-time comparison of the call's bearer token with the configured one."""
        assert self._expected is not None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        metrics = self._metrics
        needs_auth = self._expected is not None and not method.startswith(self._exempt)
        authorized = self._authorized
        state = self
        refuse_when_draining = not method.startswith(health.SERVICE_NAME + "/")
        duration = metrics.request_duration.labels(metrics.service, method)
        in_flight = metrics.in_flight.labels(metrics.service)
        count = self._count

        async def fail(exc: BaseException, context: aio.ServicerContext) -> None:
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.error("%s failed", method, exc_info=exc)
            await context.abort(code, message)

        def cancelled_code(context: aio.ServicerContext) -> str:
            # The server's copy of the deadline runs a little behind the client's (it starts when
            # the call arrives), so a call cancelled within DEADLINE_SLACK_S of it timed out.
            remaining = context.time_remaining()
            return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= DEADLINE_SLACK_S else "CANCELLED"

        def code_of(context: aio.ServicerContext, default: str) -> str:
            code = context.code()
            return code.name if isinstance(code, grpc.StatusCode) else default

        # Unary requests are parsed here rather than by gRPC, so that bytes that are not the
        # request message get INVALID_ARGUMENT instead of gRPC's INTERNAL "Exception deserializing".
        deserialize = handler.request_deserializer

        def parse(raw: Any) -> Any:
            if deserialize is None or not isinstance(raw, bytes):
                return raw
            try:
                return deserialize(raw)
            except Exception:
                raise errors.InvalidInput(
                    "request", f"{len(raw)} bytes that do not parse as the request message"
                ) from None

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
                started = time.perf_counter()
                in_flight.inc()
                code = "OK"
                try:
                    if refuse_when_draining and state.draining:
                        await state.refuse(context)
                    if needs_auth and not authorized(context):
                        raise errors.Unauthenticated("missing or invalid bearer token")
                    return await inner_uu(parse(request), context)
                except aio.AbortError:
                    code = code_of(context, "UNKNOWN")
                    raise
                except asyncio.CancelledError:
                    code = cancelled_code(context)
                    raise
                except Exception as exc:
                    code = status_for(exc)[0].name
                    await fail(exc, context)
                finally:
                    in_flight.dec()
                    duration.observe(time.perf_counter() - started)
                    count(method, code, started)

            return grpc.unary_unary_rpc_method_handler(unary_unary, None, handler.response_serializer)

        if handler.unary_stream is not None or handler.stream_stream is not None:
            streaming_request = handler.stream_stream is not None
            inner_s = handler.stream_stream if streaming_request else handler.unary_stream

            async def stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                started = time.perf_counter()
                in_flight.inc()
                code = "OK"
                try:
                    if refuse_when_draining and state.draining:
                        await state.refuse(context)
                    if needs_auth and not authorized(context):
                        raise errors.Unauthenticated("missing or invalid bearer token")
                    result = inner_s(request if streaming_request else parse(request), context)
                    if hasattr(result, "__aiter__"):
                        async for item in result:
                            yield item
                    else:  # a coroutine that writes with context.write()
                        await result
                except aio.AbortError:
                    code = code_of(context, "UNKNOWN")
                    raise
                except asyncio.CancelledError:
                    code = cancelled_code(context)
                    raise
                except Exception as exc:
                    code = status_for(exc)[0].name
                    await fail(exc, context)
                finally:
                    in_flight.dec()
                    duration.observe(time.perf_counter() - started)
                    count(method, code, started)

            if streaming_request:
                return grpc.stream_stream_rpc_method_handler(stream, deserialize, handler.response_serializer)
            return grpc.unary_stream_rpc_method_handler(stream, None, handler.response_serializer)
        return handler


class Worker(Protocol):
    """A batcher the server starts before serving and drains on shutdown."""

    def start(self) -> None: ...

    def begin_drain(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class Service:
    """What a service process serves: gRPC servicers (with their full service names) and batchers."""

    name: str
    metrics: Metrics
    servicers: list[tuple[Callable[[Any, Any], None], Any, str]] = field(default_factory=list)
    batchers: list[Worker] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)
    slots: list[Any] = field(default_factory=list)  # ModelSlots: reloadable models

    def add_servicer(self, add_to_server: Callable[[Any, Any], None], servicer: Any, full_name: str) -> None:
        self.servicers.append((add_to_server, servicer, full_name))

    @property
    def service_names(self) -> list[str]:
        return [full_name for _, _, full_name in self.servicers]


def bearer_token(settings: ServiceSettings) -> str | None:
    """The configured bearer token (None: auth off); unreadable token files are ConfigErrors."""
    try:
        return settings.bearer_token()
    except (OSError, ValueError) as exc:
        raise errors.ConfigError(f"auth token: {exc}") from None


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files, or None for plaintext."""
    if settings.tls_cert_file is None and settings.tls_key_file is None:
        if settings.tls_client_ca_file is not None:
            raise errors.ConfigError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return None
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise errors.ConfigError("TLS needs both tls_cert_file and tls_key_file")
    try:
        pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
        client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    except OSError as exc:
        raise errors.ConfigError(f"cannot read TLS file: {exc}") from None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


class GrpcServer:
    """A started grpc.aio server for one :class:`Service`, with health and reflection."""

    def __init__(self, service: Service, settings: ServiceSettings) -> None:
        self.service = service
        self.settings = settings
        options = [
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        exempt = (health.SERVICE_NAME + "/",) if settings.auth_exempt_health else ()
        self.interceptor = ServerInterceptor(service.metrics, bearer_token(settings), exempt)
        self.server = aio.server(interceptors=[self.interceptor], options=options)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for add_to_server, servicer, _ in service.servicers:
            add_to_server(servicer, self.server)
        names = [*service.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        self.port = 0
        self._watchers: list[asyncio.Task[None]] = []

    async def reload(self) -> None:
        """Load the newest version of every reloadable model (SIGHUP)."""
        for slot in self.service.slots:
            await slot.reload(explicit=True)

    async def start(self) -> int:
        """Bind, start the batchers and the server, then report SERVING; returns the bound port."""
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {address}")
        for batcher in self.service.batchers:
            batcher.start()
        await self.server.start()
        if self.settings.model_poll_interval_s > 0:
            loop = asyncio.get_running_loop()
            self._watchers = [
                loop.create_task(slot.watch(self.settings.model_poll_interval_s)) for slot in self.service.slots
            ]
        for name in ["", *self.service.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float) -> None:
        """NOT_SERVING, refuse new calls, let in-flight calls finish within ``grace``, stop batchers."""
        for watcher in self._watchers:
            watcher.cancel()
        await self.health.enter_graceful_shutdown()
        self.interceptor.draining = True
        for batcher in self.service.batchers:
            batcher.begin_drain()
        delay = self.settings.shutdown_delay_s
        hold = min(HOLD_BEFORE_CLOSE_S, delay)
        if delay - hold > 0:
            await asyncio.sleep(delay - hold)
        self.interceptor.holding = True
        if hold:
            await asyncio.sleep(hold)
        stopping = asyncio.ensure_future(self.server.stop(grace))
        await asyncio.sleep(0)  # the close (GOAWAY, listener) has begun once stop() first yields
        self.interceptor.closing()
        await stopping
        for batcher in self.service.batchers:
            await batcher.stop()


async def serve(service: Service, settings: ServiceSettings, port_file: Path | None = None) -> int:
    """Run ``service`` until SIGTERM or SIGINT; returns the process exit code."""
    metrics_port = None
    if settings.metrics_port is not None:
        metrics_server, _ = serve_metrics(service.metrics.registry, settings.metrics_host, settings.metrics_port)
        metrics_port = metrics_server.server_port
    server = GrpcServer(service, settings)
    port = await server.start()
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
        "%s serving %s on %s:%d (metrics: %s)",
        service.name,
        ", ".join(service.service_names),
        settings.host,
        port,
        f"http://{settings.metrics_host}:{metrics_port}/metrics" if metrics_port else "off",
    )
    if port_file is not None:
        _write_atomically(
            port_file,
            {
                "service": service.name,
                "host": settings.host,
                "port": port,
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
    """Calls handled so far, {method: {code: count}}, read back from the request counter."""
    counts: dict[str, dict[str, int]] = {}
    for family in metrics.requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                by_code = counts.setdefault(sample.labels["method"], {})
                by_code[sample.labels["code"]] = int(sample.value)
    return counts


def _write_atomically(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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
    configure_logging(settings.log_level)
    try:
        server_credentials(settings)
        bearer_token(settings)
        service = build(settings)
    except (errors.ModelNotFound, errors.ModelLoadError, errors.ConfigError) as exc:
        log.error("cannot start: %s", exc)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(serve(service, settings, args.port_file))
