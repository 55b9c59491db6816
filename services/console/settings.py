"""Settings of the web console (environment prefix ``NNSERVE_CONSOLE_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConsoleSettings(BaseSettings):
    """Where the console listens and which services it calls (environment prefix ``NNSERVE_CONSOLE_``)."""

    model_config = SettingsConfigDict(env_prefix="NNSERVE_CONSOLE_", extra="forbid", protected_namespaces=())

    host: str = Field("127.0.0.1", description="Address the web server binds to ('0.0.0.0' for all).")
    port: int = Field(9080, ge=0, le=65535, description="HTTP port of the page and its API; 0 picks a free one.")
    metrics_host: str = Field("127.0.0.1", description="Address of the Prometheus metrics endpoint.")
    metrics_port: int | None = Field(
        9104, ge=0, le=65535, description="Metrics HTTP port; 0 picks a free one, unset disables it."
    )
    classify_target: str = Field(
        "127.0.0.1:50051", description="gRPC target of the classify service (dns:///host:port spreads over replicas)."
    )
    restore_target: str = Field("127.0.0.1:50052", description="gRPC target of the restore service.")
    generate_target: str = Field("127.0.0.1:50053", description="gRPC target of the generate service.")
    timeout_s: float = Field(30.0, gt=0.0, description="Deadline of a classify, restore or one-shot generate call.")
    stream_timeout_s: float = Field(600.0, gt=0.0, description="Deadline of a streamed (diffusion) generation.")
    status_timeout_s: float = Field(2.0, gt=0.0, description="Deadline of each health and model-status call.")
    max_upload_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body (an uploaded image and its mask)."
    )
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest gRPC message in or out.")
    shutdown_timeout_s: float = Field(5.0, ge=0.0, description="Time open requests get to finish on SIGTERM.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
