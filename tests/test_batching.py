"""The dynamic batcher inside a real grpc.aio server, with models that misbehave on purpose."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from services.classify.__main__ import build
from services.classify.settings import ClassifySettings
from services.client import tensor_message
from services.core.batching import INLINE_BUDGET_S, DynamicBatcher
from services.core.deployment import make_batcher
from services.core.errors import InvalidInput
from services.core.metrics import Metrics
from services.core.server import GrpcServer
from services.core.settings import available_cpus
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc
from tests.helpers import metric_value


def test_a_failing_batch_is_isolated_so_only_the_poisoned_request_fails(tiny_repository: Path) -> None:
    """A merged batch holding a poisoned row is re-run request by request: the valid requests
    merged with it succeed, only the culprit gets INTERNAL, and the isolation is counted."""
    settings = ClassifySettings(
        model_repository=tiny_repository, port=0, metrics_port=None, max_delay_ms=300, inline_max_rows=0
    )
    registry = CollectorRegistry()
    service = build(settings, registry)
    batcher = service.slots[0].current.batcher
    real_predict = batcher._predict
    batch_sizes: list[int] = []

    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch_sizes.append(len(inputs["image"]))
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
    assert all(isinstance(r, classify_pb2.ClassifyResponse) for r in first[:3]), first
    poisoned = first[3]
    assert isinstance(poisoned, grpc.aio.AioRpcError) and poisoned.code() == grpc.StatusCode.INTERNAL, poisoned
    assert "failed on this request" in poisoned.details()
    assert isinstance(after, classify_pb2.ClassifyResponse)
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    merged = [n for n in batch_sizes if n > 1]
    assert merged, f"the four requests were never merged: {batch_sizes}"
    assert metric_value(text, "nnserve_batch_isolations_total") == len(merged)
    assert metric_value(text, "nnserve_grpc_requests_total", grpc_code="INTERNAL") == 1
    assert metric_value(text, "nnserve_grpc_requests_total", grpc_code="OK") == 4


def test_onnxruntime_refusing_one_requests_values_is_that_requests_invalid_argument() -> None:
    """onnxruntime's InvalidArgument on a request run alone is the request's fault."""

    class InvalidArgument(Exception):  # the name onnxruntime's pybind exception class has
        pass

    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (inputs["x"] < 0).any():
            raise InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Status Message: idx=-1 out of bounds")
        return {"y": inputs["x"] * 2}

    async def run() -> list[object]:
        batcher = DynamicBatcher(predict, name="m", max_batch_size=8, max_delay_s=0.2)
        batcher.start()
        results = await asyncio.gather(
            *(batcher.submit({"x": np.full((1, 2), v, np.float32)}) for v in (1, -1, 2)), return_exceptions=True
        )
        await batcher.stop()
        return results

    ok1, bad, ok2 = asyncio.run(run())
    assert isinstance(ok1, dict) and (ok1["y"] == 2).all()
    assert isinstance(ok2, dict) and (ok2["y"] == 4).all()
    assert isinstance(bad, InvalidInput) and "refused these values" in str(bad) and "out of bounds" in str(bad)


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


def test_a_model_slow_per_call_stays_off_the_event_loop_even_when_batches_make_rows_cheap() -> None:
    """A 16-row batch of a model that costs 5 ms a call is 0.3 ms a row; a lone row must still not run
    inline under a 2 ms budget (5 ms on the event loop would hold up every other call for longer than
    allowed and keep the queue from forming)."""
    loop_threads: list[bool] = []

    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        loop_threads.append(threading.current_thread() is threading.main_thread())
        time.sleep(0.005)
        return {"y": inputs["x"] * 2}

    async def run() -> None:
        batcher = DynamicBatcher(
            predict, name="slow", max_batch_size=16, max_delay_s=0.0, inline_max_rows=64, inline_budget_s=0.002
        )
        batcher.start()
        await batcher.submit({"x": np.ones((16, 2), np.float32)})  # the first call: nothing measured yet
        assert batcher.seconds_per_row * 1 <= 0.002  # per row, a lone request would look cheap enough
        for _ in range(3):
            await batcher.submit({"x": np.ones((1, 2), np.float32)})
        await batcher.stop()

    asyncio.run(run())
    assert loop_threads == [True, False, False, False]


def test_the_inline_budget_decides_which_calls_run_on_the_event_loop() -> None:
    """The same 1 ms model call runs on the loop under a 1 s budget and in the batcher's thread under a
    0.5 ms one (its first call, unmeasured, runs on the loop either way)."""

    def on_loop(budget_s: float) -> list[bool]:
        threads: list[bool] = []

        def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            threads.append(threading.current_thread() is threading.main_thread())
            time.sleep(0.001)
            return {"y": inputs["x"]}

        async def run() -> None:
            batcher = DynamicBatcher(predict, name="m", max_delay_s=0.0, inline_max_rows=64, inline_budget_s=budget_s)
            batcher.start()
            for _ in range(3):
                await batcher.submit({"x": np.ones((1, 2), np.float32)})
            await batcher.stop()

        asyncio.run(run())
        return threads

    assert on_loop(1.0) == [True, True, True]
    assert on_loop(0.0005) == [True, False, False]


def test_the_services_inline_budget_setting_reaches_the_batcher(tiny_repository: Path) -> None:
    settings = ClassifySettings(
        model_repository=tiny_repository, port=0, metrics_port=None, workers=available_cpus(), inline_budget_ms=7.5
    )
    batcher = make_batcher(
        settings, lambda inputs: dict(inputs), "m", Metrics(CollectorRegistry(), "classify"), version=1
    )
    assert batcher.inline_budget_s == 0.0075 and batcher.inline_max_rows == 64
    assert DynamicBatcher(lambda inputs: dict(inputs), name="m").inline_budget_s == INLINE_BUDGET_S == 0.005


def test_batches_of_a_fast_model_run_on_the_event_loop_and_stay_within_its_budget() -> None:
    """Requests that queued behind a call too big for the loop form batches that run on the loop
    (no thread hand-off), of at most as many rows as fit the 2 ms budget; the big call ran in the
    batcher's thread."""
    calls: list[tuple[int, bool]] = []
    started, release = threading.Event(), threading.Event()

    def predict(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(inputs["x"])
        calls.append((rows, threading.current_thread() is threading.main_thread()))
        if rows == 1000:  # holds the model until the small requests have queued (1000 rows: its
            # time per row stays small, however long the hold, so the estimate is not skewed)
            started.set()
            release.wait(10)
        else:
            time.sleep(0.0002 * rows)  # 0.2 ms a row: up to ten rows fit the budget
        return {"y": inputs["x"] * 2}

    async def run() -> list[dict[str, np.ndarray]]:
        batcher = DynamicBatcher(
            predict, name="fast", max_batch_size=64, max_delay_s=0.0, inline_max_rows=16, inline_budget_s=0.002
        )
        batcher.start()
        for _ in range(10):  # measured: about 0.2 ms a row
            await batcher.submit({"x": np.ones((1, 2), np.float32)})
        big = asyncio.ensure_future(batcher.submit({"x": np.ones((1000, 2), np.float32)}))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        small = [asyncio.ensure_future(batcher.submit({"x": np.full((1, 2), i, np.float32)})) for i in range(24)]
        await asyncio.sleep(0)  # every small request is queued
        release.set()
        results = await asyncio.gather(big, *small)
        await batcher.stop()
        return results

    results = asyncio.run(run())
    for i, result in enumerate(results[1:]):
        assert (result["y"] == 2 * i).all()
    assert calls[10] == (1000, False)  # more rows than inline_max_rows: the batcher's thread
    batches = calls[11:]
    assert sum(rows for rows, _ in batches) == 24
    assert all(on_loop for _, on_loop in batches), batches
    # Batched (fewer calls than requests), and none over what fits 2 ms at the measured cost.
    assert len(batches) < 24 and max(rows for rows, _ in batches) <= 10, batches
