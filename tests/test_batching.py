"""The dynamic batcher inside a real grpc.aio server, with models that misbehave on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from services.classify.__main__ import build
from services.client import tensor_message
from services.core.batching import DynamicBatcher
from services.core.server import GrpcServer
from services.core.settings import ClassifySettings
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc
from tests.helpers import metric_value


def test_a_failing_batch_fails_its_requests_with_internal_and_the_server_stays_up(tiny_repository: Path) -> None:
    """A batch holding a poisoned row fails every request in it; the next batch is served."""
    settings = ClassifySettings(model_repository=tiny_repository, port=0, metrics_port=None, max_delay_ms=300)
    registry = CollectorRegistry()
    service = build(settings, registry)
    batcher = service.slots[0].current.batcher
    real_predict = batcher._predict

    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (inputs["image"] == 1.0).all(axis=(1, 2, 3)).any():
            raise RuntimeError("simulated onnxruntime failure")
        return real_predict(inputs)

    batcher._predict = predict

    async def run() -> tuple[list[object], object]:
        server = GrpcServer(service, settings)
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = classify_pb2_grpc.ClassifyServiceStub(channel)
                good = classify_pb2.ClassifyRequest(tensor=tensor_message(np.zeros((1, 28, 28), np.uint8)))
                poison = classify_pb2.ClassifyRequest(tensor=tensor_message(np.full((1, 28, 28), 255, np.uint8)))
                calls = [stub.Classify(good, timeout=10) for _ in range(3)] + [stub.Classify(poison, timeout=10)]
                first = await asyncio.gather(*calls, return_exceptions=True)
                after = await stub.Classify(good, timeout=10)
                return first, after
        finally:
            await server.stop(1.0)

    first, after = asyncio.run(run())
    assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.INTERNAL for r in first), first
    assert all("failed on this batch" in r.details() for r in first)  # type: ignore[union-attr]
    assert isinstance(after, classify_pb2.ClassifyResponse)
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    assert metric_value(text, "nnserve_model_failures_total") == 1
    assert metric_value(text, "nnserve_grpc_requests_total", code="INTERNAL") == 4


def test_batches_respect_max_batch_size_and_split_results_back() -> None:
    """Rows come back to the request that sent them, and no call exceeds max_batch_size rows."""
    calls: list[int] = []

    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(inputs["x"]))
        return {"y": inputs["x"] * 2}

    async def run() -> list[dict[str, np.ndarray]]:
        batcher = DynamicBatcher(predict, name="double", max_batch_size=8, max_delay_s=0.05)
        batcher.start()
        sizes = [3, 1, 4, 2, 5, 1, 20]
        results = await asyncio.gather(
            *(batcher.submit({"x": np.full((n, 2), i, np.float32)}) for i, n in enumerate(sizes))
        )
        await batcher.stop()
        return results

    results = asyncio.run(run())
    for i, (n, result) in enumerate(zip([3, 1, 4, 2, 5, 1, 20], results, strict=True)):
        assert result["y"].shape == (n, 2) and (result["y"] == 2 * i).all()
    assert max(c for c in calls if c != 20) <= 8  # the 20-row request runs alone
    assert sum(calls) == 36 and len(calls) < 7
