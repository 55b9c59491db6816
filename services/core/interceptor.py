"""The one interceptor every call passes: authentication, drain, error mapping, metrics, request ids,
the access log and (when on) the call's tracing span. Its guard is put around each method's handler
once, when servicers register (:class:`Registrar`), not looked up on every call.

Domain errors (:mod:`services.core.errors`) become gRPC status codes here and nowhere else; an
unexpected exception becomes INTERNAL with a generic message and a full log line. Unary and
streaming methods go through the same :class:`_Call` guard, so they cannot drift apart.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health

from services.core import error_details, errors, logs, tracing
from services.core.batching import DEADLINE_SLACK_S
from services.core.metrics import UNKNOWN, UNTIMED_SERVICES, Metrics

log = logging.getLogger(__name__)

_STATUS: dict[type[errors.NnserveError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
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
UNKNOWN_METHOD = UNKNOWN
# The rpc.grpc.status_code attribute of a span wants the code's number.
_CODE_NUMBERS = {code.name: code.value[0] for code in grpc.StatusCode}


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
        self._unknown = grpc.unary_unary_rpc_method_handler(self._unknown_method)
        # Counted, not timed: their (nil) latency would only dilute the histogram.
        self._unknown_guard = _Guard(self, f"{UNKNOWN}/{UNKNOWN}", UNKNOWN, timed=False)
        # Request parsers that replace a method's generated deserializer ('/package.Service/Method':
        # bytes -> request), from servicers' ``request_readers`` (see GrpcServer).
        self.readers: dict[str, Callable[[bytes], Any]] = {}

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
        return self.wrap(method, handler)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` of ``method`` ('/package.Service/Method') with the guard around it (cached)."""
        wrapped = self._handlers.get(method)
        if wrapped is None:
            wrapped = self._handlers[method] = self._wrap(method.lstrip("/"), handler)
        return wrapped

    def registrar(self, server: aio.Server) -> Registrar:
        """A stand-in for ``server`` to register servicers with: their handlers are wrapped once, at
        registration, so calls skip gRPC's per-call interceptor step (``intercept_service``)."""
        return Registrar(server, self)

    def fallback(self) -> grpc.GenericRpcHandler:
        """The handler for methods no servicer registered (add it to the server last)."""
        return _Fallback(self._unknown)

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
        call = _Call(self._unknown_guard, context)
        await call.__aenter__()
        call.finish(code.name)
        await context.abort(code, message)

    def _authorized(self, context: aio.ServicerContext) -> bool:
        """Constant-time comparison of the call's bearer token with the configured one."""
        assert self._expected is not None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                return self.authorized(value)
        return False

    def authorized(self, value: str | bytes | None) -> bool:
        """Whether an ``authorization`` value (metadata or HTTP header) carries the token; True with auth off."""
        if self._expected is None:
            return True
        if value is None:
            return False
        given = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        return hmac.compare_digest(given, self._expected)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            kind = "unary"
        elif handler.unary_stream is not None:
            kind = "server_stream"
        elif handler.stream_unary is not None:
            kind = "client_stream"
        else:
            kind = "bidi_stream"
        guard = _Guard(self, method, kind)
        # Unary requests are parsed here rather than by gRPC, so that bytes that are not the
        # request message get INVALID_ARGUMENT instead of gRPC's INTERNAL "Exception deserializing".
        deserialize = self.readers.get("/" + method, handler.request_deserializer)

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
                # The same steps as ``async with _Call(...)`` around the call, written out: this runs
                # on every call, and the context manager's two coroutines were a measurable part of it.
                call = _Call(guard, context)
                call.enter()
                try:
                    if guard.needs_auth or (self.draining and guard.refuse_when_draining):
                        await call.admit()
                    reply = await inner_uu(parse(request), context)
                except BaseException as exc:
                    await call.exit(exc)  # maps domain errors to a status (abort raises)
                    raise
                call.finish("OK")
                return reply

            return grpc.unary_unary_rpc_method_handler(unary_unary, None, handler.response_serializer)

        if handler.unary_stream is not None or handler.stream_stream is not None:
            streaming_request = handler.stream_stream is not None
            inner_s = handler.stream_stream if streaming_request else handler.unary_stream

            async def stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                async with _Call(guard, context) as call:
                    await call.admit()
                    result = inner_s(request if streaming_request else parse(request), context)
                    if hasattr(result, "__aiter__"):
                        async for item in result:
                            yield item
                    else:  # a coroutine that writes with context.write()
                        await result

            if streaming_request:
                return grpc.stream_stream_rpc_method_handler(stream, deserialize, handler.response_serializer)
            return grpc.unary_stream_rpc_method_handler(stream, None, handler.response_serializer)
        return handler


class Registrar:
    """Takes servicers' registrations in place of a grpc.aio server and passes them on with every
    method handler wrapped by the :class:`ServerInterceptor` (see ServerInterceptor.registrar).

    Generated ``add_*_to_server`` functions call both methods below; both are wrapped, so a call
    finds a guarded handler whichever way gRPC looks it up.
    """

    def __init__(self, server: aio.Server, interceptor: ServerInterceptor) -> None:
        self._server = server
        self._interceptor = interceptor

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_WrappedGeneric(h, self._interceptor) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        wrap = self._interceptor.wrap
        self._server.add_registered_method_handlers(
            service, {name: wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        )


# grpc_reflection registers its asyncio servicer only on something that is an aio.Server.
aio.Server.register(Registrar)


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A servicer's generic handler whose method handlers come out wrapped (known methods only are
    cached, so probing paths cannot grow it)."""

    def __init__(self, inner: grpc.GenericRpcHandler, interceptor: ServerInterceptor) -> None:
        self._inner = inner
        self._interceptor = interceptor

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        return self._interceptor.wrap(handler_call_details.method, handler)  # type: ignore[attr-defined]


class _Fallback(grpc.GenericRpcHandler):
    """Answers methods no servicer registered: counted, and UNAUTHENTICATED before UNIMPLEMENTED."""

    def __init__(self, unknown: grpc.RpcMethodHandler) -> None:
        self._unknown = unknown

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self._unknown


class _Guard:
    """What one method's calls share: its labels and metric children, whether it needs a token, and
    (when tracing is on) its span's name and attributes."""

    def __init__(self, interceptor: ServerInterceptor, method: str, kind: str, timed: bool | None = None) -> None:
        metrics = interceptor._metrics
        self.interceptor = interceptor
        self.method = method
        self.grpc_service, _, self.grpc_method = method.rpartition("/")
        self.needs_auth = interceptor._expected is not None and not method.startswith(interceptor._exempt)
        self.refuse_when_draining = not method.startswith(health.SERVICE_NAME + "/")
        # Health and reflection calls are counted, but kept out of the latency histogram and the
        # in-flight gauge (see metrics.UNTIMED_SERVICES).
        self.timed = self.grpc_service not in UNTIMED_SERVICES if timed is None else timed
        # Probes every few seconds would drown the access log; unknown methods (probing) stay in it.
        self.logged = self.grpc_service not in UNTIMED_SERVICES
        self.labels = (metrics.service, kind, self.grpc_service, self.grpc_method)
        self.requests = metrics.requests
        self.counters: dict[str, Any] = {}
        self.duration: Any = metrics.request_duration.labels(*self.labels) if self.timed else None
        self.in_flight = metrics.in_flight.labels(metrics.service)
        self.span_attributes = {
            "rpc.system": "grpc",
            "rpc.service": self.grpc_service,
            "rpc.method": self.grpc_method,
            "nnserve.service": metrics.service,
        }

    def count(self, code: str) -> None:
        counter = self.counters.get(code)
        if counter is None:
            counter = self.counters[code] = self.requests.labels(*self.labels, code)
        counter.inc()


class _Call:
    """One call: admitted (drain, auth) first, its errors mapped and its outcome counted at the end.

    It is also the call's record for logs (``logs.current_call``): its request id, and the model and
    version the data plane resolved (``logs.note_model``).
    """

    __slots__ = ("guard", "context", "started", "request_id", "model", "version", "span", "token")

    def __init__(self, guard: _Guard, context: aio.ServicerContext) -> None:
        self.guard = guard
        self.context = context
        self.started = 0.0
        self.model: str | None = None
        self.version: int | str | None = None
        self.span: Any = None

    async def __aenter__(self) -> _Call:
        self.enter()
        return self

    def enter(self) -> None:
        """Start the call: its clock, the in-flight gauge, its request id (in the trailer), its span."""
        self.started = time.perf_counter()
        guard, context = self.guard, self.context
        if guard.timed:
            guard.in_flight.inc()
        given = None
        metadata = context.invocation_metadata() or ()
        for key, value in metadata:
            if key == logs.REQUEST_ID_KEY:
                given = value
                break
        self.request_id = logs.request_id(given)
        # Set first, so every answer carries it: gRPC keeps it through abort (and error_details adds to it).
        context.set_trailing_metadata(((logs.REQUEST_ID_KEY, self.request_id),))
        self.token = logs.current_call.set(self)
        if tracing.enabled:
            self.span = tracing.server_span(
                guard.method, metadata, {**guard.span_attributes, tracing.REQUEST_ID: self.request_id}
            )

    def finish(self, code: str) -> None:
        """Count the call (and time it, unless health or reflection), end its span, log its access line."""
        guard = self.guard
        elapsed = time.perf_counter() - self.started
        if guard.timed:
            guard.in_flight.dec()
            guard.duration.observe(elapsed)
        guard.count(code)
        if self.span is not None:
            tracing.end_server_span(
                self.span,
                code in tracing.SERVER_ERRORS,
                {
                    "rpc.grpc.status_code": _CODE_NUMBERS.get(code, 2),
                    tracing.MODEL: self.model,
                    tracing.VERSION: None if self.version is None else str(self.version),
                },
            )
        if logs.access and guard.logged:
            logs.log_access(self, code, elapsed, grpc_service=guard.grpc_service, grpc_method=guard.grpc_method)
        try:
            logs.current_call.reset(self.token)
        except ValueError:  # a stream closed from another context: that context ends with it
            pass

    async def admit(self) -> None:
        """Refuse the call while draining (UNAVAILABLE) or without a valid token (UNAUTHENTICATED)."""
        guard, interceptor = self.guard, self.guard.interceptor
        if guard.refuse_when_draining and interceptor.draining:
            await interceptor.refuse(self.context)
        if guard.needs_auth and not interceptor._authorized(self.context):
            raise errors.Unauthenticated("missing or invalid bearer token")

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        return await self.exit(exc)

    async def exit(self, exc: BaseException | None) -> bool:
        """End the call: count it; a domain error becomes its gRPC status (``context.abort`` raises
        AbortError in its place). Returns False: the exception, if any, goes on."""
        guard, context = self.guard, self.context
        code = "OK"
        finished = False
        try:
            if exc is None:
                return False
            if isinstance(exc, aio.AbortError):
                status = context.code()
                code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
                return False
            if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                # GeneratorExit: a stream whose client went away while it waited to send.
                # The server's copy of the deadline runs a little behind the client's (it starts
                # when the call arrives), so a call cancelled within DEADLINE_SLACK_S of it timed out.
                remaining = context.time_remaining()
                timed_out = remaining is not None and remaining <= DEADLINE_SLACK_S
                code = "DEADLINE_EXCEEDED" if timed_out else "CANCELLED"
                return False
            if not isinstance(exc, Exception):
                return False
            status_code, message = status_for(exc)
            code = status_code.name
            if status_code is grpc.StatusCode.INTERNAL:
                log.error("%s failed", guard.method, exc_info=exc)
            # The google.rpc details travel in the trailer, after whatever the call put there.
            trailer = (
                *(context.trailing_metadata() or ()),
                *error_details.trailing_metadata(exc, status_code, message),
            )
            # Counted before the status leaves: abort answers at once, and a client that reads the
            # metrics as soon as it has its error must find the call there.
            finished = True
            self.finish(code)
            await context.abort(status_code, message, trailer)  # raises AbortError in place of exc
            return False
        finally:
            if not finished:
                self.finish(code)
