"""Log formats, the access log and the request id every call carries.

- ``text`` (the default) is one human line per record; ``json`` is one JSON object per line with
  ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message`` and, for records logged while a call
  is handled, that call's ``request_id`` (and ``model``, ``version`` once the data plane resolved
  them); access-log records add ``grpc_service``/``grpc_method`` (or ``route``), ``code`` and
  ``latency_ms``. Log shippers (Loki, Fluent Bit, Cloud Logging) read the fields without parsing.
- The access log (off by default) is one INFO record per call on the ``nnserve.access`` logger;
  health checks (gRPC and HTTP probes) and reflection are left out of it.
- Every gRPC call gets a request id: the caller's ``x-request-id`` metadata (or HTTP header) when it
  is a sane one (printable ASCII, at most :data:`MAX_REQUEST_ID` characters), else a new uuid4 hex.
  It goes back in the trailing metadata (the ``X-Request-Id`` response header over HTTP) of every
  call, failed ones included, so a client can quote it and an operator find the call's log lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextvars import ContextVar
from typing import Any, Literal

REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID = 128

# The call being handled in this context (the interceptor's or the HTTP middleware's record of it,
# with ``request_id``, ``model`` and ``version`` attributes), or None outside calls.
current_call: ContextVar[Any] = ContextVar("nnserve_current_call", default=None)

# Whether every call gets an access-log record; process-wide, like the rest of logging's setup.
access = False
access_log = logging.getLogger("nnserve.access")

# Record attributes the JSON format writes when a record has them (from ``extra=``).
_FIELDS = ("grpc_service", "grpc_method", "route", "code", "latency_ms", "peer")


def request_id(given: str | bytes | None) -> str:
    """The caller's request id if it is usable as one (and safe to echo), else a new uuid4 hex."""
    if isinstance(given, str) and 0 < len(given) <= MAX_REQUEST_ID and given.isascii() and given.isprintable():
        return given
    return new_request_id()


_random = b""  # os.urandom bytes drawn ahead, 16 an id
_random_offset = 0


def _forget_random() -> None:
    global _random, _random_offset
    _random, _random_offset = b"", 0


os.register_at_fork(after_in_child=_forget_random)  # a forked worker must not repeat its parent's ids


def new_request_id() -> str:
    """``uuid.uuid4().hex``, built without the UUID object: every call without an id takes one,
    and this takes under half the time (version and variant bits set as RFC 4122 says). The
    random bits come 256 ids to an ``os.urandom`` call: a system call a request was measurable."""
    global _random, _random_offset
    if _random_offset >= len(_random):
        _random, _random_offset = os.urandom(4096), 0
    n = int.from_bytes(_random[_random_offset : _random_offset + 16], "big")
    _random_offset += 16
    n = (n & ~(0xF000 << 64) | (0x4000 << 64)) & ~(0xC000 << 48) | (0x8000 << 48)
    return f"{n:032x}"


class CallRecord:
    """A call's facts for its log lines (the HTTP side's; the gRPC interceptor's call object has the same)."""

    __slots__ = ("request_id", "model", "version")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.model: str | None = None
        self.version: int | str | None = None


def note_model(name: str, version: int | str) -> None:
    """Record the model and version the current call runs on (for its log lines and its span)."""
    call = current_call.get()
    if call is not None:
        call.model = name
        call.version = version


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        call = current_call.get()
        rid = getattr(record, "request_id", None) or getattr(call, "request_id", None)
        if rid:
            out["request_id"] = rid
        model = getattr(record, "model", None) or getattr(call, "model", None)
        if model:
            out["model"] = model
            version = getattr(record, "version", None) or getattr(call, "version", None)
            if version not in (None, ""):
                out["version"] = str(version)
        for key in _FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str, fmt: Literal["text", "json"] = "text", access_log_on: bool = False) -> None:
    """Set up the root logger for a service process: ``level``, the format, and the access log."""
    global access
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    access = access_log_on


def log_access(call: Any, code: str, latency_s: float, **where: str) -> None:
    """The access-log record of a finished call: ``where`` names it (grpc_service and grpc_method,
    or route), ``call`` has its request id and, when known, model and version."""
    latency_ms = round(latency_s * 1000.0, 3)
    model = getattr(call, "model", None)
    version = getattr(call, "version", None)
    target = where.get("route") or f"{where.get('grpc_service')}/{where.get('grpc_method')}"
    on = f" {model}/{version}" if model else ""
    access_log.info(
        "%s %s %.3fms%s request_id=%s",
        target,
        code,
        latency_ms,
        on,
        call.request_id,
        extra={"code": code, "latency_ms": latency_ms, "request_id": call.request_id, **where},
    )
