"""Domain errors. They carry no transport codes: ``services.core.server`` maps them to gRPC once.

Every message names the offending field and, where there is one, the limit it broke.
"""

from __future__ import annotations

import re

# Anything echoed from a request into a message is cut to this many characters: a client must not
# be able to make an error bigger than its request (gRPC refuses oversized trailing metadata).
ECHO_LIMIT = 64
_REPR_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def shorten(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)``, cut to ``limit`` characters with the full length noted (for echoing input)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 1]}...({len(text)} chars)"


def scrub(message: str) -> str:
    """A library's exception text without object reprs and heap addresses."""
    return _REPR_ADDRESS.sub("the data", message)


class NnserveError(Exception):
    """Base of every error a client may be told about."""


class InvalidInput(NnserveError):
    """The request is malformed: a field has the wrong type, shape, length or value.

    ``field`` is the offending field's path (``diffusion.steps``, ``labels[3]``) and ``problem`` what is
    wrong with it; clients get both apart too (a ``google.rpc.BadRequest`` field violation).
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class OutOfRange(InvalidInput):
    """A numeric field is well-formed but outside the range this server accepts.

    An InvalidInput: the range does not depend on the system's state, so gRPC's code table makes it
    INVALID_ARGUMENT. (OUT_OF_RANGE is for a request that may succeed once the state changes, such as
    reading past the current end of a stream; no nnserve call has such a range.)
    """

    def __init__(self, field: str, value: object, limit: str) -> None:
        super().__init__(field, f"{value} is out of range ({limit})")
        self.value = value
        self.limit = limit


class ModelNotFound(NnserveError):
    """The named model or version is not in the repository (or not served here).

    ``model`` and ``version``, when given, name what was asked for (a ``google.rpc.ResourceInfo``).
    """

    def __init__(self, message: str, model: str = "", version: str = "") -> None:
        super().__init__(message)
        self.model = model
        self.version = version


class ModelLoadError(NnserveError):
    """A model in the repository cannot be loaded: missing file, bad manifest, wrong checksum."""


class Overloaded(NnserveError):
    """The server cannot take more work now (queue full); the client may retry later.

    ``limit`` names the setting that was reached (``max_queue_size``), ``subject`` what it limits
    (``model classifier``) and ``retry_after_s`` when a retry may succeed, if the shedding logic knows
    (a ``google.rpc.QuotaFailure`` and ``RetryInfo``).
    """

    def __init__(self, message: str, limit: str = "", subject: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.subject = subject
        self.retry_after_s = retry_after_s


class DeadlineExpired(NnserveError):
    """The request's deadline passed before its work could start."""


class InferenceFailed(NnserveError):
    """The model call failed. The message is safe to show; the cause is logged."""


class Unavailable(NnserveError):
    """The server is shutting down or not ready."""


class Unauthenticated(NnserveError):
    """The call lacks valid credentials. The message says no more than that."""


class ConfigError(NnserveError):
    """The service's settings cannot work (missing or unreadable files, contradictory options)."""
