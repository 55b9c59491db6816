"""Settings of the restore service (flags, or ``NNSERVE_RESTORE_*`` variables)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.core.settings import ImageServiceSettings


class RestoreSettings(ImageServiceSettings):
    """Settings of the restore service (environment prefix ``NNSERVE_RESTORE_``)."""

    model_config = SettingsConfigDict(env_prefix="NNSERVE_RESTORE_", extra="forbid", protected_namespaces=())

    service: ClassVar[str] = "restore"
    model_settings: ClassVar[tuple[str, ...]] = ("model_name",)
    try_command: ClassVar[str] = "nnserve restore --address {address} IMAGE.png --out restored/"

    port: int = Field(50052, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    http_port: int | None = Field(8002, ge=0, le=65535, description="HTTP/REST port; unset disables it.")
    metrics_port: int | None = Field(9102, ge=0, le=65535, description="Metrics HTTP port.")
    model_name: str = Field("autoencoder", description="Model in the repository to serve.")
