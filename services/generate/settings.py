"""Settings of the generate service (flags, or ``NNSERVE_GENERATE_*`` variables)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.core.settings import ServiceSettings


class GenerateSettings(ServiceSettings):
    """Settings of the generate service (environment prefix ``NNSERVE_GENERATE_``)."""

    model_config = SettingsConfigDict(env_prefix="NNSERVE_GENERATE_", extra="forbid", protected_namespaces=())

    service: ClassVar[str] = "generate"
    # Either model may be absent ('' disables it): the service starts with whichever is there.
    model_settings: ClassVar[tuple[str, ...]] = ("gan_model", "diffusion_model")
    models_optional: ClassVar[bool] = True
    try_command: ClassVar[str] = "nnserve generate --address {address} --model gan --label 3 --count 16 --out grid.png"

    port: int = Field(50053, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    http_port: int | None = Field(8003, ge=0, le=65535, description="HTTP/REST port; unset disables it.")
    metrics_port: int | None = Field(9103, ge=0, le=65535, description="Metrics HTTP port.")
    gan_model: str = Field("gan_generator", description="GAN generator in the repository ('' to disable).")
    diffusion_model: str = Field(
        "diffusion_denoiser", description="Diffusion denoiser in the repository ('' to disable)."
    )
    max_count: int = Field(64, ge=1, description="Most images one request may ask for.")
    max_step_rows_per_request: int = Field(
        64_000, ge=1, description="Most denoiser rows one request may need: count x steps (x2 with guidance)."
    )
    step_batching: bool = Field(True, description="Share each denoiser call among all sampling requests.")
    max_rows_per_step: int = Field(256, ge=1, description="Most denoiser rows in one step-batched call.")
    max_rows_in_flight: int = Field(1024, ge=1, description="Most denoiser rows of admitted sampling requests.")
    max_waiting_jobs: int = Field(256, ge=1, description="Sampling requests that may wait for rows.")
    max_job_wait_ms: float = Field(
        5000.0,
        ge=0.0,
        description="Refuse new sampling requests while the oldest one waiting for rows has waited this long "
        "(0: off). Requests with a deadline are also refused at once when the current load would make them, or "
        "an admitted request, miss it.",
    )
