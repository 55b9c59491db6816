"""The HTTP/1.1 server of one service process: the OIP REST API and the typed routes, on aiohttp.

It runs in the same event loop as the gRPC server and calls the same servicers, so it shares their
batchers, limits and statistics; it also shares the gRPC server's bearer token (constant-time
compare), TLS files and drain flag. One middleware admits every request (drain, then auth; unknown
paths are authenticated before they are told 404, so they cannot be probed without a token), maps
errors through the gRPC side's ``status_for`` and :data:`~services.core.http_context.HTTP_STATUS`, and
counts the request by route template, never by raw path.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from services.core import error_details, errors, logs, oip, tracing
from services.core.credentials import server_credentials
from services.core.http_context import MAX_BODY, HttpAbort, error_response, http_status, request_timeout
from services.core.interceptor import ServerInterceptor, status_for
from services.core.metrics import Metrics
from services.core.rest import OipRoutes
from services.core.server import Service
from services.core.settings import ServiceSettings
from services.core.transcode import TypedRoutes

log = logging.getLogger(__name__)

HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")
UNTIMED_ROUTES = frozenset(f"GET {path}" for path in HEALTH_PATHS)


class _ClientProtocolErrors(logging.Filter):
    """aiohttp logs every request its parser refuses (bad chunking, oversized headers) at ERROR with a
    traceback, after answering 400: the client's mistake, and a way to flood the log. Drop those."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


# The logger aiohttp's protocol handler reports to, with the filter above.
protocol_log = logging.getLogger(__name__ + ".protocol")
protocol_log.addFilter(_ClientProtocolErrors())
# Route label for requests no route matched (404, 405): one series, whatever the path or method.
UNKNOWN_ROUTE = "unknown"


def ssl_context(settings: ServiceSettings) -> ssl.SSLContext | None:
    """The TLS context for the settings' PEM files (the gRPC server's), or None for plaintext."""
    server_credentials(settings)  # the same checks, and ConfigErrors, as the gRPC side
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        if settings.tls_client_ca_file is not None:
            context.load_verify_locations(settings.tls_client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise errors.ConfigError(f"cannot load TLS files for HTTP: {exc}") from None
    return context


def route_label(request: web.Request) -> str:
    """``METHOD /route/{template}`` for a matched route, else :data:`UNKNOWN_ROUTE` (bounded labels)."""
    match = request.match_info
    resource = match.route.resource
    if resource is None or match.http_exception is not None:
        return UNKNOWN_ROUTE
    return f"{request.method} {resource.canonical}"


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    """``Server: nnserve``, not aiohttp's default naming the Python and aiohttp versions; and the
    request's ``X-Request-Id`` (set here, so streamed and error replies carry it too)."""
    response.headers["Server"] = "nnserve"
    call = request.get(REQUEST_CALL)
    if call is not None:
        response.headers["X-Request-Id"] = call.request_id


# Where the guard keeps a request's logs.CallRecord (a typed key where aiohttp has them, 3.13+).
REQUEST_CALL: Any = web.RequestKey("nnserve_call", logs.CallRecord) if hasattr(web, "RequestKey") else "nnserve_call"


def _too_large_message(limit: int, size: int | None) -> str:
    given = f"{size} bytes" if size is not None else "the body (decoded, or as it arrived)"
    return f"request body: {given} is over the limit of {limit} bytes (max_message_bytes)"


class HttpServer:
    """A started aiohttp server for one :class:`Service`, beside its gRPC server."""

    def __init__(self, service: Service, settings: ServiceSettings, interceptor: ServerInterceptor) -> None:
        self.service = service
        self.settings = settings
        self.interceptor = interceptor  # its bearer token and draining flag are this server's too
        self.exempt_health = settings.auth_exempt_health
        metrics: Metrics = service.metrics
        self._requests = metrics.http_requests
        self._duration = metrics.http_request_duration
        self._in_flight = metrics.http_in_flight.labels(metrics.service)
        self._children: dict[tuple[str, str], Any] = {}
        self.name = metrics.service
        self.app = self.build_app()
        self.runner: web.AppRunner | None = None
        self.port = 0

    def build_app(self) -> web.Application:
        """The application: OIP REST routes, the typed routes of the servicers served here, the guard."""
        app = web.Application(client_max_size=self.settings.max_message_bytes, middlewares=[self._guard])
        app[MAX_BODY] = self.settings.max_message_bytes
        app.on_response_prepare.append(_server_header)
        servicers = {name: servicer for _, servicer, name in self.service.servicers}
        inference = servicers.get(oip.SERVICE_NAME)
        if isinstance(inference, oip.InferenceServicer):
            app.add_routes(OipRoutes(inference).routes())
        app.add_routes(TypedRoutes(servicers).routes())
        return app

    async def start(self) -> int:
        """Bind and serve; returns the bound port."""
        assert self.settings.http_port is not None
        # handler_cancellation: a client that goes away cancels its handler, and with it its
        # batcher entry or diffusion job, as a cancelled gRPC call does.
        self.runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            auto_decompress=False,  # read_body decodes, with the size limit and the error mapping
            logger=protocol_log,
            access_log=None,
            shutdown_timeout=self.settings.grace_period_s,
        )
        await self.runner.setup()
        site = web.TCPSite(
            self.runner,
            self.settings.http_host,
            self.settings.http_port,
            ssl_context=ssl_context(self.settings),
            reuse_port=getattr(self.settings, "workers", 1) > 1 or None,
        )
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        return self.port

    async def stop(self, grace: float) -> None:
        """Close the listener and let in-flight requests finish (``grace``, set at start), then cancel them."""
        if self.runner is not None:
            await self.runner.cleanup()

    def _count(self, route: str, status: int, started: float) -> None:
        key = (route, str(status))
        counter = self._children.get(key)
        if counter is None:
            counter = self._requests.labels(self.service.metrics.service, route, str(status))
            self._children[key] = counter
        counter.inc()
        if route not in UNTIMED_ROUTES:  # probes are counted, not timed, as gRPC health checks
            self._duration.labels(self.service.metrics.service, route).observe(time.perf_counter() - started)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.perf_counter()
        route = route_label(request)
        status = 499  # what nginx logs for a client that went away; overwritten otherwise
        self._in_flight.inc()
        call = request[REQUEST_CALL] = logs.CallRecord(logs.request_id(request.headers.get("X-Request-Id")))
        token = logs.current_call.set(call)
        span = None
        if tracing.enabled:
            headers = ((key.lower(), value) for key, value in request.headers.items())
            attributes = {"http.request.method": request.method, "http.route": route, "nnserve.service": self.name}
            span = tracing.server_span(route, headers, {**attributes, tracing.REQUEST_ID: call.request_id})
        try:
            response = await self._handle(request, handler, route)
            status = response.status
            return response
        finally:
            elapsed = time.perf_counter() - started
            self._in_flight.dec()
            self._count(route, status, started)
            if span is not None:
                version = None if call.version is None else str(call.version)
                facts = {"http.response.status_code": status, tracing.MODEL: call.model, tracing.VERSION: version}
                tracing.end_server_span(span, status >= 500, facts)
            if logs.access and route not in UNTIMED_ROUTES:
                logs.log_access(call, str(status), elapsed, route=route)
            logs.current_call.reset(token)

    async def _handle(self, request: web.Request, handler: Any, route: str) -> web.StreamResponse:
        health = route != UNKNOWN_ROUTE and request.path in HEALTH_PATHS
        try:
            if self.interceptor.draining and request.path != "/v2/health/live":
                # Connection: close, so a keep-alive client reconnects (elsewhere) for its next call.
                if route != UNKNOWN_ROUTE and request.path == "/v2/health/ready":
                    return web.json_response({"ready": False}, status=503, headers={"Connection": "close"})
                raise errors.Unavailable("server is shutting down; retry on another replica")
            if not (health and self.exempt_health) and not self.interceptor.authorized(
                request.headers.get("Authorization")
            ):
                raise errors.Unauthenticated("missing or invalid bearer token")
            routing_error = request.match_info.http_exception
            if routing_error is not None:
                if routing_error.status == 405:
                    allowed = routing_error.headers.get("Allow", "")
                    message = f"method {request.method} is not allowed on {request.path} (allowed: {allowed})"
                    return error_response(405, message, headers={"Allow": allowed})
                return error_response(routing_error.status, f"no route for {request.method} {request.path}")
            length = request.content_length
            if length is not None and length > self.settings.max_message_bytes:
                return error_response(413, _too_large_message(self.settings.max_message_bytes, length))
            timeout = request_timeout(request.headers)
            if timeout is None:
                return await handler(request)
            request["deadline"] = time.perf_counter() + timeout
            scope = asyncio.timeout(timeout)
            try:
                async with scope:
                    return await handler(request)
            except TimeoutError:
                if not scope.expired():
                    raise
                return error_response(504, f"deadline of {timeout:g}s exceeded")
        except (HttpProcessingError, RequestPayloadError) as exc:  # a body aiohttp cannot read
            cause = exc.__cause__ if isinstance(exc.__cause__, HttpProcessingError) else exc
            detail = cause.message.strip() if isinstance(cause, HttpProcessingError) else ""
            return error_response(400, f"request body: {detail or 'cannot be read'}")
        except web.HTTPRequestEntityTooLarge:
            limit = self.settings.max_message_bytes
            length = request.content_length
            return error_response(413, _too_large_message(limit, length if length and length > limit else None))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(exc.status, exc.text or exc.reason)
        except HttpAbort as exc:
            return error_response(http_status(exc.code), exc.message)
        except Exception as exc:
            code, message = status_for(exc)
            status = http_status(code)
            if status == 500:
                log.error("%s failed", route, exc_info=exc)
            headers = {"Connection": "close"} if isinstance(exc, errors.Unavailable) else None
            return error_response(status, message, headers=headers, details=error_details.details_json(exc))
