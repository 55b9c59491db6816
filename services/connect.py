"""Connection options shared by the ``nnserve`` client commands and ``nnserve loadtest``.

TLS (``--tls``, ``--tls-ca-file``, a client certificate for mutual TLS) and a bearer token
(``--token`` or ``--token-file``), turned into a blocking or an asyncio gRPC channel. A token over
TLS travels as call credentials; without TLS (a server behind a mesh or on loopback) it is sent as
``authorization`` metadata in cleartext, which the help says.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grpc

__all__ = [
    "ConnectionOptionError",
    "add_connection_arguments",
    "check_connection_arguments",
    "aio_channel",
    "blocking_channel",
    "services_at",
]


class ConnectionOptionError(Exception):
    """A connection option that cannot work (a file that cannot be read, a half-given pair)."""


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the TLS and token options to a client command's parser."""
    group = parser.add_argument_group("security (for a service started with TLS and/or --auth-token-file)")
    group.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, trusting the system's CA bundle (default: plaintext, unless a --tls-* file is given)",
    )
    group.add_argument(
        "--tls-ca-file",
        type=Path,
        default=None,
        help="PEM CA bundle to verify the server with; implies --tls (default: the system's CA bundle)",
    )
    group.add_argument(
        "--tls-client-cert-file",
        type=Path,
        default=None,
        help="PEM client certificate for mutual TLS, with its key (default: none)",
    )
    group.add_argument(
        "--tls-client-key-file", type=Path, default=None, help="PEM key of --tls-client-cert-file (default: none)"
    )
    tokens = group.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token",
        default=None,
        help="bearer token sent on every call (visible in the process list: prefer --token-file); "
        "without TLS it travels in cleartext (default: none, no authorization header)",
    )
    tokens.add_argument(
        "--token-file", type=Path, default=None, help="read the bearer token from this file (default: none)"
    )


class _Security(NamedTuple):
    credentials: grpc.ChannelCredentials | None
    token: str | None


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConnectionOptionError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _security(args: argparse.Namespace) -> _Security:
    if (args.tls_client_cert_file is None) != (args.tls_client_key_file is None):
        raise ConnectionOptionError("--tls-client-cert-file and --tls-client-key-file go together")
    token = args.token
    if args.token_file is not None:
        token = (_read(args.token_file, "token file") or b"").decode().strip()
        if not token:
            raise ConnectionOptionError(f"token file {args.token_file} is empty")
    tls = args.tls or args.tls_ca_file is not None or args.tls_client_cert_file is not None
    credentials = None
    if tls:
        credentials = grpc.ssl_channel_credentials(
            _read(args.tls_ca_file, "CA file"),
            _read(args.tls_client_key_file, "client key"),
            _read(args.tls_client_cert_file, "client certificate"),
        )
        if token:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
            token = None  # sent by the credentials
    return _Security(credentials, token)


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class _ClientCallDetails(_Details, grpc.ClientCallDetails):
    pass


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a plaintext channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> _ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    intercept_unary_unary = intercept_unary_stream = _call
    intercept_stream_unary = intercept_stream_stream = _call


def check_connection_arguments(args: argparse.Namespace) -> None:
    """Raise :class:`ConnectionOptionError` now if the security options cannot work (files unreadable, ...)."""
    _security(args)


def blocking_channel(target: str, args: argparse.Namespace, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A blocking channel to ``target`` with the security options in ``args``."""
    security = _security(args)
    if security.credentials is not None:
        return grpc.secure_channel(target, security.credentials, options=list(options))
    channel = grpc.insecure_channel(target, options=list(options))
    if security.token:
        return grpc.intercept_channel(channel, _TokenInterceptor(security.token))
    return channel


class _AioToken:
    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files each interceptor under the first kind it is (an elif chain), so one class per kind.
class _AioUnaryToken(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioStreamToken(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def aio_channel(target: str, args: argparse.Namespace, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` with the security options in ``args``."""
    security = _security(args)
    if security.credentials is not None:
        return grpc.aio.secure_channel(target, security.credentials, options=list(options))
    interceptors: list[Any] | None = None
    if security.token:
        interceptors = [_AioUnaryToken(security.token), _AioStreamToken(security.token)]
    return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)


def services_at(channel: grpc.Channel, timeout: float = 5.0) -> list[str]:
    """The gRPC services the server behind ``channel`` says it serves (reflection; [] if it will not say)."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        for reply in stub.ServerReflectionInfo(iter([request]), timeout=timeout):
            return sorted(s.name for s in reply.list_services_response.service)
    except grpc.RpcError:
        pass
    return []
