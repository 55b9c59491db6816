"""The google.rpc details of a failed call, on the exception the client raises.

Servers attach ``google.rpc`` details to their errors (:mod:`services.core.error_details`): a
``BadRequest`` field violation for INVALID_ARGUMENT, ``QuotaFailure`` and ``RetryInfo`` for
RESOURCE_EXHAUSTED, ``ResourceInfo`` for NOT_FOUND and an ``ErrorInfo`` for every domain error. The
clients' channels raise :class:`RpcError`, a ``grpc.RpcError`` (so ``except grpc.RpcError`` and
``code()``/``details()`` work as before) with those details decoded into attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


class RpcError(grpc.RpcError):
    """A failed call with its google.rpc details; ``code()``, ``details()`` and the metadata are the call's."""

    def __init__(self, error: grpc.RpcError) -> None:
        super().__init__(str(error))
        self.error = error
        self.status: status_pb2.Status | None = _status_of(error)
        self.field_violations: list[error_details_pb2.BadRequest.FieldViolation] = []
        self.quota_violations: list[error_details_pb2.QuotaFailure.Violation] = []
        self.retry_delay_s: float | None = None
        self.resource: error_details_pb2.ResourceInfo | None = None
        self.error_info: error_details_pb2.ErrorInfo | None = None
        for detail in self.status.details if self.status is not None else ():
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                self.field_violations.extend(bad.field_violations)
            elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                quota = error_details_pb2.QuotaFailure()
                detail.Unpack(quota)
                self.quota_violations.extend(quota.violations)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                self.retry_delay_s = retry.retry_delay.ToNanoseconds() / 1e9
            elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
                self.resource = error_details_pb2.ResourceInfo()
                detail.Unpack(self.resource)
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                self.error_info = error_details_pb2.ErrorInfo()
                detail.Unpack(self.error_info)

    @property
    def reason(self) -> str:
        """ErrorInfo's reason (``INVALID_INPUT``, ``OVERLOADED``, ``MODEL_NOT_FOUND``, ...), '' without one."""
        return self.error_info.reason if self.error_info is not None else ""

    def code(self) -> grpc.StatusCode:
        return self.error.code()  # type: ignore[attr-defined,no-any-return]

    def details(self) -> str:
        return self.error.details()  # type: ignore[attr-defined,no-any-return]

    def trailing_metadata(self) -> Any:
        return self.error.trailing_metadata()  # type: ignore[attr-defined]

    def initial_metadata(self) -> Any:
        return self.error.initial_metadata()  # type: ignore[attr-defined]

    def debug_error_string(self) -> str:
        return self.error.debug_error_string()  # type: ignore[attr-defined,no-any-return]

    def explain(self) -> str:
        """The details in one line, for a person: the fields at fault, the limit, when to retry."""
        parts = [f"{v.field}: {v.description}" for v in self.field_violations]
        parts += [f"{v.subject} ({v.quota_id})" if v.quota_id else v.subject for v in self.quota_violations]
        if self.retry_delay_s is not None:
            parts.append(f"retry in {self.retry_delay_s:g} s")
        if self.resource is not None and self.resource.resource_name:
            parts.append(f"{self.resource.resource_type} {self.resource.resource_name}")
        return "; ".join(parts)

    def __str__(self) -> str:
        return str(self.error)

    # The blocking unary path of an intercepted channel reads its outcome as a future.
    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> RpcError:
        return self

    def traceback(self, timeout: float | None = None) -> Any:
        return self.__traceback__

    def done(self) -> bool:
        return True

    def running(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def cancel(self) -> bool:
        return False

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False


def _status_of(error: grpc.RpcError) -> status_pb2.Status | None:
    if not isinstance(error, grpc.Call):
        return None
    try:
        return rpc_status.from_call(error)  # type: ignore[no-any-return]
    except ValueError:  # details that disagree with the status: ignore them, keep the status
        return None


class _Stream:
    """A server stream whose errors come as :class:`RpcError`; everything else is the call's."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            raise RpcError(exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class RichErrors(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """A client interceptor that turns a failed call's ``grpc.RpcError`` into :class:`RpcError`."""

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        outcome = continuation(client_call_details, request)
        # Blocking calls get a finished outcome; a .future() call is passed through as it is.
        if outcome.done():
            error = outcome.exception()
            if isinstance(error, grpc.RpcError) and not isinstance(error, RpcError):
                return RpcError(error)
        return outcome

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return _Stream(continuation(client_call_details, request))


def with_rich_errors(channel: grpc.Channel) -> grpc.Channel:
    """``channel``, raising :class:`RpcError` (with the google.rpc details) for failed calls."""
    return grpc.intercept_channel(channel, RichErrors())
