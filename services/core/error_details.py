"""``google.rpc`` rich error details for the domain errors, beside the status message.

A client reads the offending field, the limit that was reached, when to retry or which model was
missing from typed messages (``grpc_status.rpc_status.from_call``) instead of parsing the message:

- INVALID_ARGUMENT: ``BadRequest`` with one field violation (the field's path and what is wrong);
- RESOURCE_EXHAUSTED: ``QuotaFailure`` (what is limited, by which setting) and ``RetryInfo``;
- NOT_FOUND: ``ResourceInfo`` (the model, and the version asked for);
- every domain error: ``ErrorInfo`` with a stable reason and the domain ``nnserve``.

gRPC carries them as a serialized ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer
(:func:`trailing_metadata`); the HTTP routes put the same details, as proto3 JSON, in the error body
(:func:`details_json`).
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.core import errors

log = logging.getLogger(__name__)

DOMAIN = "nnserve"
# RetryInfo's delay when the shedding logic has no estimate: about one batch of a slow model.
DEFAULT_RETRY_S = 0.5
# The message travels twice (grpc-message, and base64 in the details trailer), so what the details add
# is kept short: gRPC caps trailing metadata (8 KiB by default), and request text is echoed here.
NAME_CHARS = 128
TEXT_CHARS = 256


def _cut(text: str, limit: int) -> str:
    # Echoed request text may hold lone surrogates, which protobuf strings (UTF-8) refuse.
    text = text.encode("utf-8", "replace").decode("utf-8")
    if len(text) <= limit:
        return text
    suffix = f"...({len(text)} chars)"
    return text[: limit - len(suffix)] + suffix


# ErrorInfo.reason per domain error (UPPER_SNAKE_CASE, as google.rpc asks); the most specific class wins.
REASONS: dict[type[errors.NnserveError], str] = {
    errors.OutOfRange: "VALUE_OUT_OF_RANGE",
    errors.InvalidInput: "INVALID_INPUT",
    errors.ModelNotFound: "MODEL_NOT_FOUND",
    errors.ModelLoadError: "MODEL_NOT_LOADABLE",
    errors.Overloaded: "OVERLOADED",
    errors.DeadlineExpired: "DEADLINE_EXPIRED",
    errors.InferenceFailed: "INFERENCE_FAILED",
    errors.Unavailable: "UNAVAILABLE",
    errors.Unauthenticated: "UNAUTHENTICATED",
    errors.ConfigError: "CONFIG_ERROR",
}


def reason_for(exc: BaseException) -> str | None:
    """The ErrorInfo reason for a domain error, None for anything else (an unexpected exception)."""
    for cls in type(exc).__mro__:
        reason = REASONS.get(cls)  # type: ignore[call-overload]
        if reason is not None:
            return reason
    return None


def details_for(exc: BaseException) -> list[Message]:
    """The ``google.rpc`` detail messages for ``exc`` (none for an unexpected exception: its
    message is generic, and so are its details)."""
    reason = reason_for(exc)
    if reason is None:
        return []
    metadata: dict[str, str] = {}
    details: list[Message] = []
    if isinstance(exc, errors.InvalidInput):
        field = _cut(exc.field, NAME_CHARS)
        metadata["field"] = field
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=field, description=_cut(exc.problem, TEXT_CHARS), reason=reason
        )
        if isinstance(exc, errors.OutOfRange):
            metadata["limit"] = _cut(exc.limit, TEXT_CHARS)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    elif isinstance(exc, errors.Overloaded):
        subject = _cut(exc.subject or "server", NAME_CHARS)
        metadata["subject"] = subject
        if exc.limit:
            metadata["limit"] = exc.limit
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=subject, description=_cut(str(exc), TEXT_CHARS), quota_id=exc.limit
        )
        details.append(error_details_pb2.QuotaFailure(violations=[violation]))
        retry = error_details_pb2.RetryInfo()
        delay = exc.retry_after_s if exc.retry_after_s is not None else DEFAULT_RETRY_S
        retry.retry_delay.FromNanoseconds(int(max(0.0, delay) * 1e9))
        details.append(retry)
    elif isinstance(exc, errors.ModelNotFound):
        model, version = _cut(exc.model, NAME_CHARS), _cut(exc.version, NAME_CHARS)
        name = model + (f"/{version}" if version else "")
        if model:
            metadata["model"] = model
        if version:
            metadata["version"] = version
        details.append(
            error_details_pb2.ResourceInfo(
                resource_type="nnserve.model" if not version else "nnserve.model_version",
                resource_name=name,
                description=_cut(str(exc), TEXT_CHARS),
            )
        )
    details.append(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))
    return details


def rich_status(exc: BaseException, code: grpc.StatusCode, message: str) -> status_pb2.Status:
    """The ``google.rpc.Status`` of a failed call: ``code`` and ``message`` as sent, and the details."""
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details_for(exc):
        status.details.add().Pack(detail)
    return status


def trailing_metadata(exc: BaseException, code: grpc.StatusCode, message: str) -> tuple[tuple[str, Any], ...]:
    """The trailer that carries the details (``grpc-status-details-bin``); empty when there are none."""
    try:
        status = rich_status(exc, code, message)
    except Exception:  # the details are a help; a failure to build them must not change the status
        log.exception("cannot build the error details of %s", type(exc).__name__)
        return ()
    if not status.details:
        return ()
    return tuple(rpc_status.to_status(status).trailing_metadata)


def details_json(exc: BaseException) -> list[dict[str, Any]]:
    """The details as proto3 JSON objects with their ``@type``, for an HTTP error body (as
    gRPC-JSON transcoding writes a ``google.rpc.Status``)."""
    status = status_pb2.Status()
    try:
        for detail in details_for(exc):
            status.details.add().Pack(detail)
    except Exception:
        log.exception("cannot build the error details of %s", type(exc).__name__)
        return []
    document = json_format.MessageToDict(status, preserving_proto_field_name=False)
    details: list[dict[str, Any]] = document.get("details", [])
    return details


def unpack(status: status_pb2.Status) -> list[Message]:
    """The detail messages of a ``google.rpc.Status`` (unknown types are skipped), for clients."""
    known: list[type[Message]] = [
        error_details_pb2.BadRequest,
        error_details_pb2.QuotaFailure,
        error_details_pb2.RetryInfo,
        error_details_pb2.ResourceInfo,
        error_details_pb2.ErrorInfo,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.DebugInfo,
        error_details_pb2.Help,
        error_details_pb2.LocalizedMessage,
        error_details_pb2.RequestInfo,
    ]
    out: list[Message] = []
    for any_message in status.details:
        for cls in known:
            if any_message.Is(cls.DESCRIPTOR):
                message = cls()
                any_message.Unpack(message)
                out.append(message)
                break
    return out
