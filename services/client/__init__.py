"""Typed gRPC clients for nnserve, used by the CLI, the tests and the load generator."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc, tensor_pb2

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, round_robin: bool = False
) -> list[tuple[str, object]]:
    """Channel options matching the server's message limit; round_robin spreads calls over every
    address a DNS name resolves to (use a ``dns:///host:port`` target)."""
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if round_robin:
        options.append(("grpc.lb_policy_name", "round_robin"))
    return options


def tensor_message(images: np.ndarray) -> tensor_pb2.Tensor:
    """A Tensor message from a uint8 or float32 numpy array."""
    if images.dtype == np.uint8:
        dtype = tensor_pb2.DATA_TYPE_UINT8
    elif images.dtype == np.float32:
        dtype = tensor_pb2.DATA_TYPE_FLOAT32
    else:
        raise TypeError(f"images must be uint8 or float32, got {images.dtype}")
    array = np.ascontiguousarray(images)
    return tensor_pb2.Tensor(
        dtype=dtype, shape=list(array.shape), data=array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    )


class ClassifyClient:
    """Blocking client of nnserve.v1.ClassifyService."""

    def __init__(self, target: str, channel: grpc.Channel | None = None, round_robin: bool = False) -> None:
        self.channel = channel or grpc.insecure_channel(target, options=channel_options(round_robin=round_robin))
        self.stub = classify_pb2_grpc.ClassifyServiceStub(self.channel)

    def classify(
        self,
        images: Sequence[bytes] = (),
        tensor: np.ndarray | None = None,
        top_k: int = 0,
        timeout: float | None = None,
    ) -> classify_pb2.ClassifyResponse:
        request = classify_pb2.ClassifyRequest(images=list(images), top_k=top_k)
        if tensor is not None:
            request.tensor.CopyFrom(tensor_message(tensor))
        return self.stub.Classify(request, timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ClassifyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_health(target: str, service: str = "", timeout: float = 5.0) -> str:
    """grpc.health.v1 Check: the status name (SERVING, NOT_SERVING, ...) of ``service`` at ``target``."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
