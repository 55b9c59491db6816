"""The classify service, as a real process on a free port, over real gRPC channels."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from services.client import ClassifyClient, channel_options, tensor_message
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc, tensor_pb2
from tests.helpers import ServiceProcess, metric_value, start_service

# The labels of the typed Classify call's series.
METHOD = {"grpc_service": "nnserve.v1.ClassifyService", "grpc_method": "Classify"}


def reference_probabilities(repository: Path, version: int, images: np.ndarray) -> np.ndarray:
    """In-process onnxruntime on the same model: softmax of its logits."""
    session = ort.InferenceSession(str(repository / "classifier" / str(version) / "model.onnx"))
    logits = session.run(None, {"image": images})[0]
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def sample_images(n: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, 28, 28]: a bright blob on a dark background, like the training data."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 30, size=(n, 28, 28)).astype(np.uint8)
    for i in range(n):
        top, left = rng.integers(2, 12, size=2)
        images[i, top : top + 14, left : left + 12] = rng.integers(150, 255)
    return images


def probs_of(reply: classify_pb2.ClassifyResponse) -> list[dict[int, float]]:
    return [{p.class_id: p.probability for p in c.predictions} for c in reply.classifications]


def test_tensor_and_png_inputs_match_in_process_onnxruntime(
    classify_server: ServiceProcess, tiny_repository: Path
) -> None:
    images = sample_images(6)
    expected = reference_probabilities(tiny_repository, 2, images.astype(np.float32)[:, None] / 255.0)
    with ClassifyClient(classify_server.address) as client:
        by_uint8 = client.classify(tensor=images, top_k=10)
        by_float = client.classify(tensor=images.astype(np.float32)[:, None] / 255.0, top_k=10)
        by_png = client.classify(images=[png_bytes(im) for im in images], top_k=10)
    assert by_uint8.model_name == "classifier" and by_uint8.model_version == 2  # highest version served
    for reply in (by_uint8, by_float, by_png):
        got = probs_of(reply)
        assert len(got) == len(images)
        for row, probs in zip(expected, got, strict=True):
            assert sorted(probs) == list(range(10))
            np.testing.assert_allclose([probs[c] for c in range(10)], row, rtol=1e-5, atol=1e-6)
            top = reply.classifications[0].predictions
            assert [p.probability for p in top] == sorted((p.probability for p in top), reverse=True)


def test_top_k_and_labels(classify_server: ServiceProcess) -> None:
    with ClassifyClient(classify_server.address) as client:
        reply = client.classify(tensor=sample_images(1), top_k=3)
        default = client.classify(tensor=sample_images(1))
    assert len(reply.classifications[0].predictions) == 3
    assert len(default.classifications[0].predictions) == 5
    first = reply.classifications[0].predictions[0]
    from training.data import LABELS

    assert first.label == LABELS[first.class_id]


def test_light_background_photo_is_inverted_like_training_data(classify_server: ServiceProcess) -> None:
    """A dark object on a white page, ten times larger, classifies like its dark-background twin."""
    images = sample_images(1, seed=3)
    images[0, 0, :] = images[0, -1, :] = images[0, :, 0] = images[0, :, -1] = 0  # a clean border
    photo = Image.fromarray(255 - images[0], mode="L").resize((280, 280), Image.NEAREST).convert("RGB")
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    with ClassifyClient(classify_server.address) as client:
        from_photo = probs_of(client.classify(images=[buffer.getvalue()], top_k=10))[0]
        from_twin = probs_of(client.classify(tensor=images, top_k=10))[0]
    np.testing.assert_allclose([from_photo[c] for c in range(10)], [from_twin[c] for c in range(10)], atol=0.02)


def _tensor(dtype: int, shape: list[int], data: bytes) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


U8, F32 = tensor_pb2.DATA_TYPE_UINT8, tensor_pb2.DATA_TYPE_FLOAT32
GOOD = np.zeros((1, 28, 28), np.uint8).tobytes()

BAD_REQUESTS = {
    "empty request": (classify_pb2.ClassifyRequest(), "INVALID_ARGUMENT", "images"),
    "undecodable bytes": (classify_pb2.ClassifyRequest(images=[b"not an image"]), "INVALID_ARGUMENT", "images[0]"),
    "empty image bytes": (classify_pb2.ClassifyRequest(images=[b""]), "INVALID_ARGUMENT", "images[0]"),
    "truncated png": (
        classify_pb2.ClassifyRequest(images=[png_bytes(np.zeros((28, 28), np.uint8))[:40]]),
        "INVALID_ARGUMENT",
        "images[0]",
    ),
    "wrong shape": (
        classify_pb2.ClassifyRequest(tensor=_tensor(U8, [1, 32, 32], bytes(1024))),
        "INVALID_ARGUMENT",
        "tensor.shape",
    ),
    "zero rows": (
        classify_pb2.ClassifyRequest(tensor=_tensor(U8, [0, 28, 28], b"")),
        "INVALID_ARGUMENT",
        "tensor.shape",
    ),
    "negative dim": (
        classify_pb2.ClassifyRequest(tensor=_tensor(U8, [-3, 28, 28], b"")),
        "INVALID_ARGUMENT",
        "tensor.shape",
    ),
    "rank 5": (
        classify_pb2.ClassifyRequest(tensor=_tensor(U8, [1, 1, 1, 28, 28], GOOD)),
        "INVALID_ARGUMENT",
        "tensor.shape",
    ),
    "unspecified dtype": (
        classify_pb2.ClassifyRequest(tensor=_tensor(0, [1, 28, 28], GOOD)),
        "INVALID_ARGUMENT",
        "tensor.dtype",
    ),
    "unknown dtype": (
        classify_pb2.ClassifyRequest(tensor=_tensor(7, [1, 28, 28], GOOD)),
        "INVALID_ARGUMENT",
        "tensor.dtype",
    ),
    "short data": (
        classify_pb2.ClassifyRequest(tensor=_tensor(U8, [1, 28, 28], GOOD[:-1])),
        "INVALID_ARGUMENT",
        "tensor.data",
    ),
    "float data length": (
        classify_pb2.ClassifyRequest(tensor=_tensor(F32, [1, 28, 28], GOOD)),
        "INVALID_ARGUMENT",
        "tensor.data",
    ),
    "nan": (
        classify_pb2.ClassifyRequest(tensor=_tensor(F32, [28, 28], np.full((28, 28), np.nan, np.float32).tobytes())),
        "INVALID_ARGUMENT",
        "NaN",
    ),
    "inf": (
        classify_pb2.ClassifyRequest(tensor=_tensor(F32, [28, 28], np.full((28, 28), np.inf, np.float32).tobytes())),
        "INVALID_ARGUMENT",
        "NaN or infinity",
    ),
    "float out of range": (
        classify_pb2.ClassifyRequest(tensor=_tensor(F32, [28, 28], np.full((28, 28), 3, np.float32).tobytes())),
        "INVALID_ARGUMENT",
        "[0, 1]",
    ),
    "top_k too large": (
        classify_pb2.ClassifyRequest(tensor=_tensor(U8, [1, 28, 28], GOOD), top_k=11),
        "INVALID_ARGUMENT",
        "top_k",
    ),
    "too many images": (
        classify_pb2.ClassifyRequest(tensor=_tensor(U8, [1025, 28, 28], b"")),
        "INVALID_ARGUMENT",
        "limit of 1024",
    ),
    "unknown version": (
        classify_pb2.ClassifyRequest(tensor=_tensor(U8, [1, 28, 28], GOOD), model_version=9),
        "NOT_FOUND",
        "model_version",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(classify_server: ServiceProcess, case: str) -> None:
    request, code, needle = BAD_REQUESTS[case]
    with grpc.insecure_channel(classify_server.address, options=channel_options()) as channel:
        stub = classify_pb2_grpc.ClassifyServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Classify(request, timeout=10)
        assert caught.value.code().name == code, caught.value.details()
        assert needle in caught.value.details()
        ok = stub.Classify(classify_pb2.ClassifyRequest(tensor=tensor_message(sample_images(1))), timeout=10)
        assert len(ok.classifications) == 1


def test_large_request_beyond_grpc_default_message_size(classify_server: ServiceProcess) -> None:
    """1024 float32 images are 3.2 MB; the server takes what its 64 MiB default allows."""
    images = np.random.default_rng(0).random((1024, 1, 28, 28), dtype=np.float32)
    with ClassifyClient(classify_server.address) as client:
        reply = client.classify(tensor=images, top_k=1)
    assert len(reply.classifications) == 1024


async def _concurrent_classify(address: str, n: int, timeout: float = 30.0) -> list[object]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = classify_pb2_grpc.ClassifyServiceStub(channel)
        request = classify_pb2.ClassifyRequest(tensor=tensor_message(sample_images(1)))
        calls = [stub.Classify(request, timeout=timeout) for _ in range(n)]
        return await asyncio.gather(*calls, return_exceptions=True)


def test_concurrent_callers_are_batched_and_counted(tiny_repository: Path, tmp_path: Path) -> None:
    # A batching delay makes requests wait for company (and turns the inline path off), so the
    # test does not depend on how fast a loaded machine delivers the 64 calls.
    classify_server = start_service("services.classify", tiny_repository, tmp_path, "--max-delay-ms", "200")
    try:
        _check_batched(classify_server)
    finally:
        assert classify_server.stop() == 0


def test_small_requests_on_an_idle_model_run_inline_without_queueing(tiny_repository: Path, tmp_path: Path) -> None:
    # Inline needs a worker per CPU (the default): then no core is spare to overlap inference with.
    workers = str(len(os.sched_getaffinity(0)))
    classify_server = start_service("services.classify", tiny_repository, tmp_path, "--workers", workers)
    try:
        _check_inline(classify_server)
    finally:
        assert classify_server.stop() == 0


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_the_service_runs_on_uvloop_by_default_and_on_asyncio_when_asked(
    tiny_repository: Path, tmp_path: Path, loop: str
) -> None:
    workers = str(len(os.sched_getaffinity(0)))
    server = start_service("services.classify", tiny_repository, tmp_path, "--workers", workers, "--event-loop", loop)
    try:
        _check_inline(server)  # serves, inline and on the same metrics, on either loop
    finally:
        assert server.stop() == 0
    assert f"event loop: {'uvloop' if loop == 'auto' else 'asyncio'})" in server.log()


def _check_inline(classify_server: ServiceProcess, attempts: int = 5) -> None:
    """Five one-at-a-time calls run inline: one model call each, and none waits in the queue.

    The inline path closes for a while after a model call slower than its budget (inline_budget_ms,
    5 ms), which a busy machine can cause in any call; so a round with a queued call is tried again,
    and the check fails only if no round of ``attempts`` ran wholly inline.
    """
    waits = []
    with ClassifyClient(classify_server.address) as client:
        for _ in range(attempts):
            before = classify_server.metrics_text()
            for _ in range(5):
                assert len(client.classify(tensor=sample_images(2)).classifications) == 2
            after = classify_server.metrics_text()

            def delta(name: str) -> float:
                return metric_value(after, name) - metric_value(before, name)  # noqa: B023

            assert delta("nnserve_model_executions_total") == 5 and delta("nnserve_model_inference_rows_total") == 10
            assert delta("nnserve_batch_queue_wait_seconds_count") == 5
            waits.append(delta("nnserve_batch_queue_wait_seconds_sum"))
            if waits[-1] == 0.0:  # never queued
                return
    pytest.fail(f"no round of 5 calls ran wholly inline; queue wait per round: {waits}")


def _check_batched(classify_server: ServiceProcess) -> None:
    before = classify_server.metrics_text()
    results = asyncio.run(_concurrent_classify(classify_server.address, 64))
    assert all(isinstance(r, classify_pb2.ClassifyResponse) for r in results), results
    after = classify_server.metrics_text()
    ok = metric_value(after, "nnserve_grpc_requests_total", **METHOD, grpc_code="OK") - metric_value(
        before, "nnserve_grpc_requests_total", **METHOD, grpc_code="OK"
    )
    assert ok == 64
    rows = metric_value(after, "nnserve_batch_size_rows_sum") - metric_value(before, "nnserve_batch_size_rows_sum")
    batches = metric_value(after, "nnserve_batch_size_rows_count") - metric_value(
        before, "nnserve_batch_size_rows_count"
    )
    assert rows == 64
    assert batches < 64, "no two concurrent requests shared a model call"
    # Some batch held more than one row: the <=1 bucket counts fewer than all batches.
    assert metric_value(after, "nnserve_batch_size_rows_bucket", le="1.0") < metric_value(
        after, "nnserve_batch_size_rows_count"
    )
    assert (
        metric_value(after, "nnserve_model_info", model="classifier", version="2", provider="CPUExecutionProvider") == 1
    )


def test_metrics_pass_promtool(classify_server: ServiceProcess, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus); CI installs it")
    asyncio.run(_concurrent_classify(classify_server.address, 4))
    text = classify_server.metrics_text()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in (
        "nnserve_grpc_request_duration_seconds_bucket",
        "nnserve_batch_queue_wait_seconds_bucket",
        "nnserve_model_inference_duration_seconds_bucket",
        "nnserve_batch_queue_depth_requests",
        "nnserve_grpc_requests_in_flight",
    ):
        assert name in text


def test_health_is_serving_overall_and_per_service(classify_server: ServiceProcess) -> None:
    with grpc.insecure_channel(classify_server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "nnserve.v1.ClassifyService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(classify_server: ServiceProcess) -> None:
    with grpc.insecure_channel(classify_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(
            stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        )
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"nnserve.v1.ClassifyService", "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="nnserve.v1.ClassifyService")
        replies = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        assert replies[0].file_descriptor_response.file_descriptor_proto


def test_configured_version_is_served(tiny_repository: Path, tmp_path: Path) -> None:
    server = start_service("services.classify", tiny_repository, tmp_path, "--model-version", "1")
    try:
        with ClassifyClient(server.address) as client:
            reply = client.classify(tensor=sample_images(2), top_k=10)
        assert reply.model_version == 1
        expected = reference_probabilities(tiny_repository, 1, sample_images(2).astype(np.float32)[:, None] / 255.0)
        got = probs_of(reply)
        np.testing.assert_allclose([got[0][c] for c in range(10)], expected[0], rtol=1e-5, atol=1e-6)
    finally:
        assert server.stop() == 0


def test_full_queue_is_refused_at_once(tiny_repository: Path, tmp_path: Path) -> None:
    server = start_service(
        "services.classify",
        tiny_repository,
        tmp_path,
        "--max-queue-size",
        "4",
        "--max-delay-ms",
        "1500",
        "--max-batch-size",
        "256",
    )
    try:
        started = time.perf_counter()

        async def run() -> list[object]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = classify_pb2_grpc.ClassifyServiceStub(channel)
                request = classify_pb2.ClassifyRequest(tensor=tensor_message(sample_images(1)))
                first = [asyncio.ensure_future(stub.Classify(request, timeout=20)) for _ in range(4)]
                await asyncio.sleep(0.3)  # the four are admitted and wait for their batch to fill
                refused_at = time.perf_counter()
                try:
                    await stub.Classify(request, timeout=20)
                except grpc.aio.AioRpcError as exc:
                    refused = (exc.code(), exc.details(), time.perf_counter() - refused_at)
                return [refused, *await asyncio.gather(*first, return_exceptions=True)]

        refused, *admitted = asyncio.run(run())
        code, details, seconds = refused
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue_size=4" in details
        assert seconds < 0.5, "refusal must not wait for the queue"
        assert all(isinstance(r, classify_pb2.ClassifyResponse) for r in admitted), admitted
        assert time.perf_counter() - started < 10
        text = server.metrics_text()
        assert metric_value(text, "nnserve_batch_rejected_total", reason="queue_full") == 1
        assert metric_value(text, "nnserve_grpc_requests_total", **METHOD, grpc_code="RESOURCE_EXHAUSTED") == 1
    finally:
        assert server.stop() == 0


def test_expired_deadline_is_not_run(tiny_repository: Path, tmp_path: Path) -> None:
    server = start_service(
        "services.classify", tiny_repository, tmp_path, "--max-delay-ms", "1000", "--max-batch-size", "256"
    )
    try:
        with ClassifyClient(server.address) as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.classify(tensor=sample_images(1), timeout=0.2)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(1.2)  # the batch formed after its deadline and dropped it
            text = server.metrics_text()
            assert metric_value(text, "nnserve_batch_rejected_total", reason="deadline_exceeded") == 1
            assert metric_value(text, "nnserve_model_inference_rows_total") == 0
            assert metric_value(text, "nnserve_grpc_requests_total", **METHOD, grpc_code="DEADLINE_EXCEEDED") == 1
            assert len(client.classify(tensor=sample_images(3), timeout=5).classifications) == 3
    finally:
        assert server.stop() == 0


def test_graceful_shutdown_finishes_in_flight_calls(tiny_repository: Path, tmp_path: Path) -> None:
    """SIGTERM: health turns NOT_SERVING, new calls are refused, queued calls complete, exit 0."""
    server = start_service(
        "services.classify",
        tiny_repository,
        tmp_path,
        "--max-delay-ms",
        "2000",
        "--max-batch-size",
        "256",
        "--grace-period-s",
        "20",
    )

    async def run() -> tuple[list[int], list[object], object]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            statuses = [(await watch.read()).status]
            stub = classify_pb2_grpc.ClassifyServiceStub(channel)
            request = classify_pb2.ClassifyRequest(tensor=tensor_message(sample_images(2)))
            in_flight = [asyncio.ensure_future(stub.Classify(request, timeout=30)) for _ in range(8)]
            await asyncio.sleep(0.3)
            server.proc.send_signal(signal.SIGTERM)
            statuses.append((await watch.read()).status)
            await asyncio.sleep(0.1)
            try:
                late: object = await stub.Classify(request, timeout=5)
            except grpc.aio.AioRpcError as exc:
                late = exc.code()
            return statuses, await asyncio.gather(*in_flight, return_exceptions=True), late

    statuses, results, late = asyncio.run(run())
    assert statuses == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
    assert all(isinstance(r, classify_pb2.ClassifyResponse) and len(r.classifications) == 2 for r in results), results
    assert late == grpc.StatusCode.UNAVAILABLE
    assert server.proc.wait(timeout=20) == 0
    assert "stopped" in server.log()


def test_a_model_with_its_own_ood_score_output_is_flagged_by_it(tmp_path: Path) -> None:
    """Classifier v2 computes its out-of-distribution score in the graph (an ``ood_score`` output
    next to the logits); the service must report that score and flag by its calibrated threshold,
    not the logits' energy."""
    from onnx import TensorProto, helper

    from services.core.manifest import Manifest, OodCalibration, TensorSpec
    from tests.helpers import LABELS, _save

    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("ReduceMean", ["flat", "axis"], ["mean"], keepdims=0),  # brightness as the "score"
            helper.make_node("Identity", ["mean"], ["ood_score"]),
            helper.make_node("Slice", ["flat", "start", "end", "axis"], ["logits"]),
        ],
        "tiny_ood_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10]),
            helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["batch"]),
        ],
        initializer=[
            helper.make_tensor("start", TensorProto.INT64, [1], [0]),
            helper.make_tensor("end", TensorProto.INT64, [1], [10]),
            helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
        ],
    )
    directory = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path, "classifier", 1)
    from services.core.manifest import file_sha256

    Manifest(
        name="classifier",
        version=1,
        task="image-classification",
        sha256=file_sha256(directory / "model.onnx"),
        opset=18,
        inputs=[TensorSpec(name="image", dtype="float32", shape=[-1, 1, 28, 28])],
        outputs=[
            TensorSpec(name="logits", dtype="float32", shape=[-1, 10]),
            TensorSpec(name="ood_score", dtype="float32", shape=[-1]),
        ],
        labels=list(LABELS),
        ood=OodCalibration(score="energy", threshold=0.5, calibration="fixed, for tests"),
    ).write(directory / "manifest.json")
    server = start_service("services.classify", tmp_path, tmp_path / "run")
    try:
        pixels = np.zeros((2, 28, 28), np.uint8)
        pixels[1] = 255  # mean 1.0: over the threshold
        with ClassifyClient(server.address) as client:
            reply = client.classify(tensor=pixels)
    finally:
        assert server.stop() == 0
    scores = [c.ood_score for c in reply.classifications]
    assert scores == pytest.approx([0.0, 1.0])
    assert [c.out_of_distribution for c in reply.classifications] == [False, True]


def test_small_and_large_batches_post_process_alike() -> None:
    """The plain-Python path for a few images gives the numpy path's top-k, probabilities and energies."""
    from services.classify.model import _small_batch, energy, softmax

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(64, 10)).astype(np.float32)
    logits[0, 3] = logits[0, 7] = logits[0].max() + 1  # a tie at the top stays in class order
    logits[1] = 0.0  # all equal
    for k in (1, 5, 10):
        ids, probabilities, energies = _small_batch(logits.tolist(), k)
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        assert ids == top.tolist()
        expected = np.take_along_axis(softmax(logits), top, axis=1)
        np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(energies, energy(logits), rtol=1e-5, atol=1e-6)
    assert _small_batch(logits[:1].tolist(), 2)[0] == [[3, 7]]
    assert _small_batch(logits[1:2].tolist(), 3)[0] == [[0, 1, 2]]
