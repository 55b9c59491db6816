"""Settings of the classify service (flags, or ``NNSERVE_CLASSIFY_*`` variables)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.core.settings import ImageServiceSettings


class ClassifySettings(ImageServiceSettings):
    """Settings of the classify service (environment prefix ``NNSERVE_CLASSIFY_``)."""

    model_config = SettingsConfigDict(env_prefix="NNSERVE_CLASSIFY_", extra="forbid", protected_namespaces=())

    service: ClassVar[str] = "classify"
    model_settings: ClassVar[tuple[str, ...]] = ("model_name", "robust_model")
    # The robust classifier is served beside the standard one when the repository has it.
    optional_model_settings: ClassVar[tuple[str, ...]] = ("robust_model",)
    try_command: ClassVar[str] = "nnserve classify --address {address} IMAGE.png"

    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    http_port: int | None = Field(8001, ge=0, le=65535, description="HTTP/REST port; unset disables it.")
    metrics_port: int | None = Field(9101, ge=0, le=65535, description="Metrics HTTP port.")
    model_name: str = Field("classifier", description="Model in the repository to serve.")
    robust_model: str = Field(
        "classifier_robust",
        description="Adversarially trained classifier served beside model_name, picked per request by "
        "ClassifyRequest.model_name ('' disables it; the default is skipped when the repository lacks it).",
    )
    default_top_k: int = Field(5, ge=1, le=10, description="top_k when a request leaves it 0.")
