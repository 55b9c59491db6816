"""What every HTTP route shares: one gRPC-code -> HTTP-status table, JSON errors, deadlines, and the
context adapter that lets a gRPC servicer method run for an HTTP request.

Servicer methods only read their context for the deadline (and, rarely, abort), so the HTTP routes call
the very same methods the gRPC server does: the domain logic exists once, and the errors it raises map
to the same message under both transports (``status_for``), with the status from :data:`HTTP_STATUS`.
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, TypeVar

import grpc
from aiohttp import web

from services.core import errors
from services.core.errors import shorten
from services.core.images import off_loop

T = TypeVar("T")

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# gRPC's timeout header (as grpc-web and Envoy's transcoder read it): up to 8 digits and a unit.
_GRPC_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_UNIT_S = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status for a gRPC status code: 500 for any code the table does not name."""
    return HTTP_STATUS.get(code, 500)


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None, details: list[dict[str, Any]] | None = None
) -> web.Response:
    """The protocol's error body, ``{"error": "..."}``, with ``status``; with ``details`` (the google.rpc
    details of a domain error as proto3 JSON, see :mod:`services.core.error_details`) beside it."""
    body: dict[str, Any] = {"error": message}
    if details:
        body["details"] = details
    return web.json_response(body, status=status, headers=headers)


def request_timeout(headers: Mapping[str, str]) -> float | None:
    """Seconds the client allows the call, from ``grpc-timeout`` (``100m``) or ``X-Request-Timeout`` (``0.1``)."""
    value = headers.get("grpc-timeout")
    if value is not None:
        match = _GRPC_TIMEOUT.match(value.strip())
        if match is None:
            raise errors.InvalidInput("grpc-timeout header", f"{shorten(value)} is not 1-8 digits and a unit (HMSmun)")
        return int(match.group(1)) * _UNIT_S[match.group(2)]
    value = headers.get("X-Request-Timeout")
    if value is not None:
        try:
            seconds = float(value)
        except ValueError:
            seconds = float("nan")
        if not 0 < seconds < 1e8:
            raise errors.InvalidInput(
                "X-Request-Timeout header", f"{shorten(value)} is not a positive number of seconds"
            )
        return seconds
    return None


# Converting more than this many bytes (JSON parsing, multipart, zlib) goes to the decode pool: a
# 64 MiB JSON body takes seconds to parse, which on the event loop would stall every other call.
OFF_LOOP_BYTES = 256 * 1024


async def convert(size: int, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``: at once when ``size`` bytes are few, else in the decode pool (off_loop)."""
    if size <= OFF_LOOP_BYTES:
        return function(*args)
    return await off_loop(function, *args)


# The largest request body, after decoding its Content-Encoding (the settings' max_message_bytes).
MAX_BODY = web.AppKey("max_body", int)


async def read_body(request: web.Request) -> bytes:
    """The request body, decoded from its ``Content-Encoding`` (identity, gzip or deflate, as Triton's
    clients send), at most the app's :data:`MAX_BODY` bytes before and after decoding.

    aiohttp's own decoding is off (``auto_decompress=False``): a body that is not what its header
    says would otherwise fail inside the HTTP parser, with a plain-text 500 and a logged traceback.
    """
    body = await request.read()
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise web.HTTPUnsupportedMediaType(
            text=f"Content-Encoding: {shorten(encoding)} is not accepted; send gzip, deflate or identity"
        )
    return await convert(len(body), _decompress, body, encoding, request.app[MAX_BODY])


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        decoded = decoder.decompress(body, limit + 1)
    except zlib.error as exc:
        raise errors.InvalidInput("request body", f"is not valid {encoding} data ({exc})") from None
    if len(decoded) > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(decoded))
    if not decoder.eof:
        raise errors.InvalidInput("request body", f"its {encoding} data ends early")
    return decoded


class HttpAbort(Exception):
    """A servicer called ``context.abort`` while serving an HTTP request."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class HttpContext:
    """Stands in for ``grpc.aio.ServicerContext`` when a servicer method serves an HTTP request."""

    def __init__(self, request: web.Request, deadline: float | None) -> None:
        self._request = request
        self._deadline = deadline  # a time.perf_counter() instant

    def time_remaining(self) -> float | None:
        """Seconds left before the request's deadline, or None without one (as gRPC's)."""
        return None if self._deadline is None else max(0.0, self._deadline - time.perf_counter())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The request headers, lower-cased, as gRPC metadata."""
        return tuple((key.lower(), value) for key, value in self._request.headers.items())

    def peer(self) -> str:
        return f"http:{self._request.remote}"

    async def abort(self, code: grpc.StatusCode, details: str = "", *_: Any) -> NoReturn:
        raise HttpAbort(code, details)
