"""TLS and bearer-token settings turned into what the gRPC server needs; bad settings are ConfigErrors."""

from __future__ import annotations

import grpc

from services.core import errors
from services.core.settings import ServiceSettings


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
