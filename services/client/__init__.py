"""Typed gRPC clients for nnserve, used by the CLI, the tests and the load generator."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Self

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client.errors import RpcError, with_rich_errors
from services.client.modelinfo import ModelInfoClient
from services.core.convert import tensor_message
from services.proto.nnserve.v1 import (
    classify_pb2,
    classify_pb2_grpc,
    generate_pb2,
    generate_pb2_grpc,
    restore_pb2,
    restore_pb2_grpc,
)

__all__ = [
    "ClassifyClient",
    "GenerateClient",
    "ModelInfoClient",
    "RestoreClient",
    "RpcError",
    "channel_options",
    "check_health",
    "secure_channel",
    "tensor_message",
]

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


# Retry calls a server refused with UNAVAILABLE (say, a replica shutting down) on another replica,
# and watch each replica's grpc.health.v1 status so a draining one (NOT_SERVING) gets no new calls.
RETRY_SERVICE_CONFIG = json.dumps(
    {
        "healthCheckConfig": {"serviceName": ""},
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, round_robin: bool = False, retry: bool = False
) -> list[tuple[str, object]]:
    """Channel options matching the server's message limit; round_robin spreads calls over every
    address a DNS name resolves to (use a ``dns:///host:port`` target); retry retries UNAVAILABLE."""
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if round_robin:
        options.append(("grpc.lb_policy_name", "round_robin"))
    if retry:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", RETRY_SERVICE_CONFIG)]
    return options


def secure_channel(
    target: str,
    ca_file: str | None = None,
    token: str | None = None,
    client_cert_file: str | None = None,
    client_key_file: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> grpc.Channel:
    """A TLS channel (CA bundle, optional client certificate for mutual TLS) that sends
    ``authorization: Bearer <token>`` on every call when a token is given."""

    def read(path: str | None) -> bytes | None:
        return None if path is None else open(path, "rb").read()

    credentials = grpc.ssl_channel_credentials(read(ca_file), read(client_key_file), read(client_cert_file))
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(target, credentials, options=channel_options(max_message_bytes))


class _Client:
    """A blocking client over one channel (its own, or one passed in); usable as a context manager."""

    def __init__(self, target: str, channel: grpc.Channel | None = None, round_robin: bool = False) -> None:
        # Failed calls raise services.client.errors.RpcError: a grpc.RpcError with the google.rpc details.
        self.channel = with_rich_errors(
            channel or grpc.insecure_channel(target, options=channel_options(round_robin=round_robin))
        )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ClassifyClient(_Client):
    """Blocking client of nnserve.v1.ClassifyService."""

    def __init__(self, target: str, channel: grpc.Channel | None = None, round_robin: bool = False) -> None:
        super().__init__(target, channel, round_robin)
        self.stub = classify_pb2_grpc.ClassifyServiceStub(self.channel)

    def classify(
        self,
        images: Sequence[bytes] = (),
        tensor: np.ndarray | None = None,
        top_k: int = 0,
        timeout: float | None = None,
        model_name: str = "",
    ) -> classify_pb2.ClassifyResponse:
        """Classify ``images`` (encoded) or ``tensor``; ``model_name`` '' asks the service's default."""
        request = classify_pb2.ClassifyRequest(images=list(images), top_k=top_k, model_name=model_name)
        if tensor is not None:
            request.tensor.CopyFrom(tensor_message(tensor))
        return self.stub.Classify(request, timeout=timeout)


class RestoreClient(_Client):
    """Blocking client of nnserve.v1.RestoreService."""

    def __init__(self, target: str, channel: grpc.Channel | None = None, round_robin: bool = False) -> None:
        super().__init__(target, channel, round_robin)
        self.stub = restore_pb2_grpc.RestoreServiceStub(self.channel)

    def restore(
        self,
        images: Sequence[bytes] = (),
        tensor: np.ndarray | None = None,
        masks: Sequence[bytes] = (),
        mask_tensor: np.ndarray | None = None,
        as_tensor: bool = False,
        timeout: float | None = None,
    ) -> restore_pb2.RestoreResponse:
        output = restore_pb2.RESTORE_OUTPUT_TENSOR if as_tensor else restore_pb2.RESTORE_OUTPUT_PNG
        request = restore_pb2.RestoreRequest(images=list(images), masks=list(masks), output=output)
        if tensor is not None:
            request.tensor.CopyFrom(tensor_message(tensor))
        if mask_tensor is not None:
            request.mask_tensor.CopyFrom(tensor_message(mask_tensor))
        return self.stub.Restore(request, timeout=timeout)


# Sampler names for requests; "default" leaves the choice (and the default steps and guidance that
# go with it) to the service, which takes them from the denoiser's manifest.
SAMPLERS = {
    "default": generate_pb2.SAMPLER_UNSPECIFIED,
    "ddim": generate_pb2.SAMPLER_DDIM,
    "ddpm": generate_pb2.SAMPLER_DDPM,
    "dpm++": generate_pb2.SAMPLER_DPM_SOLVER_PP,
}


class GenerateClient(_Client):
    """Blocking client of nnserve.v1.GenerateService."""

    def __init__(self, target: str, channel: grpc.Channel | None = None, round_robin: bool = False) -> None:
        super().__init__(target, channel, round_robin)
        self.stub = generate_pb2_grpc.GenerateServiceStub(self.channel)

    @staticmethod
    def request(
        model: str = "gan",
        count: int = 1,
        labels: Sequence[int] = (),
        seed: int | None = None,
        output: str = "pngs",
        sampler: str = "default",
        steps: int = 0,
        eta: float = 0.0,
        guidance_scale: float | None = None,
        preview_every: int = 0,
    ) -> generate_pb2.GenerateRequest:
        """Build a GenerateRequest from plain values (model 'gan'/'diffusion', output 'pngs'/'grid'/'tensor')."""
        request = generate_pb2.GenerateRequest(
            model=generate_pb2.GENERATOR_MODEL_DIFFUSION if model == "diffusion" else generate_pb2.GENERATOR_MODEL_GAN,
            count=count,
            labels=list(labels),
            output={
                "pngs": generate_pb2.GENERATE_OUTPUT_PNGS,
                "grid": generate_pb2.GENERATE_OUTPUT_GRID,
                "tensor": generate_pb2.GENERATE_OUTPUT_TENSOR,
            }[output],
        )
        if seed is not None:
            request.seed = seed
        options = request.diffusion
        options.sampler = SAMPLERS[sampler]
        options.steps, options.eta, options.preview_every = steps, eta, preview_every
        if guidance_scale is not None:
            options.guidance_scale = guidance_scale
        return request

    def generate(self, timeout: float | None = None, **kwargs: object) -> generate_pb2.GenerateResponse:
        return self.stub.Generate(self.request(**kwargs), timeout=timeout)  # type: ignore[arg-type]

    def stream(self, timeout: float | None = None, **kwargs: object):  # type: ignore[no-untyped-def]
        """Iterate GenerateEvents (progress, then the result)."""
        return self.stub.GenerateStream(self.request(**kwargs), timeout=timeout)  # type: ignore[arg-type]


def check_health(target: str, service: str = "", timeout: float = 5.0) -> str:
    """grpc.health.v1 Check: the status name (SERVING, NOT_SERVING, ...) of ``service`` at ``target``."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
