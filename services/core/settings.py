"""Settings every service shares: the pydantic-settings base class and the flags built from it.

Each service declares its own class (``services/<name>/settings.py``) with its environment prefix,
defaults and limits, and which settings name models in the repository, so ``nnserve up`` and the
deployment checks read ports and models from there.

Parsed once in each service's ``main()`` (from flags, then ``NNSERVE_<SERVICE>_*`` variables, then
defaults) and passed down; nothing else in the package reads the environment.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args, get_origin

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup (v2 or v1) CPU quota if one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:  # cgroup v2
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        try:  # cgroup v1
            quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            if quota_us > 0 and period_us > 0:
                cpus = min(cpus, max(1, quota_us // period_us))
        except (OSError, ValueError):
            pass
    return max(1, cpus)


class ServiceSettings(BaseSettings):
    """Settings every service shares. Subclasses set the environment prefix and their own limits,
    and say which of their settings name repository models (``model_settings``; with
    ``models_optional`` the service starts with any of them, the others set to ''; the settings in
    ``optional_model_settings`` are served when their model is there and switched off when not)."""

    service: ClassVar[str] = ""
    model_settings: ClassVar[tuple[str, ...]] = ()
    models_optional: ClassVar[bool] = False
    optional_model_settings: ClassVar[tuple[str, ...]] = ()
    try_command: ClassVar[str] = ""

    model_config = SettingsConfigDict(env_prefix="NNSERVE_", extra="forbid", protected_namespaces=())

    host: str = Field("127.0.0.1", description="Address the gRPC server binds to ('0.0.0.0' for all).")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    http_host: str = Field("127.0.0.1", description="Address the HTTP/REST server binds to ('0.0.0.0' for all).")
    http_port: int | None = Field(
        8000,
        ge=0,
        le=65535,
        description="HTTP/REST port (OIP REST and typed routes); 0 picks a free one, unset disables it.",
    )
    metrics_host: str = Field("127.0.0.1", description="Address of the Prometheus metrics endpoint.")
    metrics_port: int | None = Field(
        9100, ge=0, le=65535, description="Metrics HTTP port; 0 picks a free one, unset disables it."
    )
    model_repository: Path = Field(Path("models"), description="Root of models/<name>/<version>/.")
    model_version: int | None = Field(None, ge=1, description="Version to serve; default the highest.")
    providers: Annotated[list[str], NoDecode] = Field(
        ["CPUExecutionProvider"],
        description="onnxruntime execution providers in order of preference, comma-separated (or a JSON list), "
        "e.g. CUDAExecutionProvider,CPUExecutionProvider.",
    )
    precision: Literal["fp32", "int8"] = Field(
        "fp32", description="Model variant to serve: fp32, or int8 (quantized, for CPUs) where the version ships one."
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="onnxruntime intra-op threads per worker; 0 shares the CPUs this process may use among workers.",
    )
    workers: int = Field(
        0,
        ge=0,
        description="Serving processes on the same port (SO_REUSEPORT), each with its own session and batcher; "
        "0: one per CPU this process may use.",
    )
    allow_spinning: bool = Field(False, description="Let onnxruntime threads spin-wait between calls.")
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto",
        description="The event loop: uvloop (libuv; less work per call), asyncio's own, or auto: uvloop when "
        "it is installed.",
    )
    max_batch_size: int = Field(64, ge=1, description="Most rows the batcher merges into one model call.")
    max_delay_ms: float = Field(
        0.0,
        ge=0.0,
        description="Longest a request waits for others to join its batch. 0 (as Triton's default): batches "
        "still form from requests that queue while the model is busy, without delaying a lone request.",
    )
    max_queue_size: int = Field(
        1024, ge=1, description="Requests allowed to wait for the model; beyond it RESOURCE_EXHAUSTED."
    )
    max_queue_wait_ms: float = Field(
        250.0, ge=0.0, description="Refuse new requests while the oldest queued one has waited this long (0: off)."
    )
    batching: bool = Field(True, description="Merge concurrent requests; off runs each request alone.")
    inline_max_rows: int = Field(
        64,
        ge=0,
        description="A request of at most this many rows that finds its model idle runs at once on the event "
        "loop, without a thread hand-off, if the model's measured time for it is within inline_budget_ms "
        "(0: always queue). Requests that meet contention still batch.",
    )
    inline_budget_ms: float = Field(
        5.0,
        gt=0.0,
        description="The longest model call that may run on the event loop (inline, or a batch that fits it): "
        "a longer one goes to the batcher's thread, so the loop keeps answering other calls meanwhile.",
    )
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest gRPC message in or out.")
    shutdown_delay_s: float = Field(
        0.5, ge=0.0, description="On SIGTERM, refuse new calls (UNAVAILABLE) this long before closing the listener."
    )
    grace_period_s: float = Field(10.0, ge=0.0, description="Time in-flight calls get to finish on SIGTERM.")
    model_poll_interval_s: float = Field(
        10.0, ge=0.0, description="How often to look for a newer model version to load (0: only on SIGHUP)."
    )
    warmup: bool = Field(True, description="Run the model once per batch size bucket before SERVING.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines as text, or json: one object per line (time, level, logger, message, request_id, "
        "model, version, code, latency_ms).",
    )
    access_log: bool = Field(
        False, description="Log one line per call (method or route, code, latency, request id, model and version)."
    )
    tracing: bool = Field(
        False,
        description="OpenTelemetry tracing (the tracing extra): a span per call continuing the caller's traceparent, "
        "with queue-wait, batch and inference spans; exported by OTLP as the OTEL_* environment configures.",
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM server certificate (chain); with tls_key_file enables TLS."
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of the server certificate.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."
    )
    auth_token: SecretStr | None = Field(
        None, description="Bearer token every call must carry (prefer auth_token_file)."
    )
    auth_token_file: Path | None = Field(None, description="File holding the bearer token (first line).")
    auth_exempt_health: bool = Field(True, description="Let grpc.health.v1 calls through without the token (probes).")

    def bearer_token(self) -> str | None:
        """The configured bearer token, from auth_token or auth_token_file, or None when auth is off."""
        if self.auth_token is not None:
            return self.auth_token.get_secret_value()
        if self.auth_token_file is not None:
            token = self.auth_token_file.read_text().strip().splitlines()
            if not token or not token[0].strip():
                raise ValueError(f"{self.auth_token_file}: empty token file")
            return token[0].strip()
        return None

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: Any) -> Any:
        """From the environment the list comes as text: 'A,B' as a user writes it, or JSON."""
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [p.strip() for p in text.split(",") if p.strip()]
        return value

    @field_validator("workers")
    @classmethod
    def _resolve_workers(cls, value: int) -> int:
        return value or available_cpus()

    @property
    def threads(self) -> int:
        """Effective intra-op thread count of each worker."""
        return self.intra_op_threads or max(1, available_cpus() // self.workers)


S = TypeVar("S", bound=ServiceSettings)


class ImageServiceSettings(ServiceSettings):
    """Settings of services that take encoded images: how many, and how many pixels, one request may carry."""

    max_images_per_request: int = Field(1024, ge=1, description="Most images one request may carry.")
    max_request_pixels: int = Field(
        64_000_000,
        ge=1,
        description="Most pixels the encoded images of one request may decode to, summed; larger requests get "
        "INVALID_ARGUMENT before any decoding.",
    )


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[ServiceSettings]) -> None:
    """One ``--kebab-case`` flag per settings field; flags override environment variables."""
    prefix = cls.model_config.get("env_prefix", "")
    for name, info in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = info.default if not isinstance(info.default, Path) else str(info.default)
        help_text = f"{info.description or ''} [env {prefix}{name.upper()}; default {default}]"
        # A switch may stand alone (--access-log) or take a value (--access-log false).
        switch: dict[str, Any] = {"nargs": "?", "const": "true"} if info.annotation is bool else {}
        parser.add_argument(flag, dest=f"setting_{name}", default=None, metavar=name.upper(), help=help_text, **switch)


def settings_from_args(cls: type[S], args: argparse.Namespace) -> S:
    """Build ``cls`` from parsed flags (those given), then the environment, then defaults."""
    given: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        value = getattr(args, f"setting_{name}", None)
        if value is None:
            continue
        if get_origin(info.annotation) is list:
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif value.lower() in ("none", "off", "") and type(None) in get_args(info.annotation):
            value = None
        given[name] = value
    return cls(**given)
