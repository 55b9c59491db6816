"""The Open Inference Protocol endpoint of the classify service, over real gRPC."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from services.client import tensor_message
from services.proto.inference import grpc_service_pb2 as pb
from services.proto.inference import grpc_service_pb2_grpc as pb_grpc
from services.proto.inference import model_config_pb2 as config_pb
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc
from tests.helpers import ServiceProcess, metric_value


@pytest.fixture
def stub(classify_server: ServiceProcess):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(classify_server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def reference_logits(repository: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repository / "classifier" / "2" / "model.onnx"))
    return session.run(None, {"image": images})[0]


def infer_request(images: np.ndarray, raw: bool = True, **kwargs: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="classifier", **kwargs)  # type: ignore[arg-type]
    tensor = request.inputs.add(name="image", datatype="FP32", shape=images.shape)
    if raw:
        request.raw_input_contents.append(images.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(images.ravel().tolist())
    return request


def test_server_and_model_status(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="classifier")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="classifier", version="2")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="classifier", version="1")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "nnserve" and set(meta.extensions) == {"model_configuration", "statistics"}


def test_model_metadata_and_config(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="classifier"))
    assert meta.platform == "onnxruntime_onnx" and list(meta.versions) == ["2"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("image", "FP32", [-1, 1, 28, 28])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("logits", "FP32", [-1, 10])]
    config = stub.ModelConfig(pb.ModelConfigRequest(name="classifier")).config
    assert config.max_batch_size == 64 and config.platform == "onnxruntime_onnx"
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("image", config_pb.TYPE_FP32, [1, 28, 28])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [10])]
    assert (
        config.HasField("dynamic_batching") and config.instance_group[0].kind == config_pb.ModelInstanceGroup.KIND_CPU
    )


@pytest.mark.parametrize("batch", [1, 8, 64])  # 64 images: over wire.ZERO_COPY_MIN_BYTES
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_model_infer_matches_in_process_onnxruntime(
    stub: pb_grpc.GRPCInferenceServiceStub, tiny_repository: Path, batch: int, raw: bool
) -> None:
    images = np.random.default_rng(batch).random((batch, 1, 28, 28), dtype=np.float32)
    reply = stub.ModelInfer(infer_request(images, raw=raw, id=f"req-{batch}"), timeout=10)
    assert reply.id == f"req-{batch}" and reply.model_name == "classifier" and reply.model_version == "2"
    (out,) = reply.outputs
    assert out.name == "logits" and out.datatype == "FP32" and list(out.shape) == [batch, 10]
    logits = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(batch, 10)
    np.testing.assert_allclose(logits, reference_logits(tiny_repository, images), rtol=1e-5, atol=1e-6)


def test_requested_outputs(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = infer_request(np.zeros((2, 1, 28, 28), np.float32))
    request.outputs.add(name="logits")
    assert [o.name for o in stub.ModelInfer(request).outputs] == ["logits"]


def _bad(images: np.ndarray, **changes: object) -> pb.ModelInferRequest:
    request = infer_request(images)
    for key, value in changes.items():
        if key == "datatype":
            request.inputs[0].datatype = str(value)
        elif key == "shape":
            del request.inputs[0].shape[:]
            request.inputs[0].shape.extend(value)  # type: ignore[arg-type]
        elif key == "raw":
            request.raw_input_contents[0] = value  # type: ignore[assignment]
        elif key == "name":
            request.inputs[0].name = str(value)
        elif key == "output":
            request.outputs.add(name=str(value))
        elif key == "model_name":
            request.model_name = str(value)
        elif key == "model_version":
            request.model_version = str(value)
        elif key == "twice":  # the same input again, with its own raw bytes
            request.inputs.add().CopyFrom(request.inputs[0])
            request.raw_input_contents.append(request.raw_input_contents[0])
        elif key == "contents":  # values in contents as well as in raw_input_contents
            request.inputs[0].contents.fp32_contents.extend([0.0] * images.size)
    return request


X = np.zeros((2, 1, 28, 28), np.float32)
BAD = {
    "unknown model": (_bad(X, model_name="gan"), "NOT_FOUND", "unknown model 'gan'"),
    "unknown version": (_bad(X, model_version="7"), "NOT_FOUND", "no version '7'"),
    "wrong datatype": (_bad(X, datatype="INT64"), "INVALID_ARGUMENT", "input 'image': datatype must be FP32"),
    "wrong shape": (_bad(X, shape=[2, 3, 28, 28]), "INVALID_ARGUMENT", "input 'image': shape [2, 3, 28, 28]"),
    "wrong rank": (_bad(X, shape=[2, 784]), "INVALID_ARGUMENT", "input 'image': shape"),
    "byte length": (_bad(X, raw=b"\0" * 10), "INVALID_ARGUMENT", "raw_input_contents[0] has 10 bytes"),
    "unknown input": (_bad(X, name="pixels"), "INVALID_ARGUMENT", "no input 'pixels'"),
    "unknown output": (_bad(X, output="probs"), "INVALID_ARGUMENT", "no output 'probs'"),
    "too large batch": (_bad(X, shape=[5000, 1, 28, 28]), "INVALID_ARGUMENT", "over the limit of 1024"),
    "input twice": (_bad(X, twice=True), "INVALID_ARGUMENT", "needs exactly one each of ['image']"),
    "contents and raw": (_bad(X, contents=True), "INVALID_ARGUMENT", "has contents while raw_input_contents is used"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_infer_requests(stub: pb_grpc.GRPCInferenceServiceStub, case: str) -> None:
    request, code, needle = BAD[case]
    # A valid request of the same header first: decode_inputs' fast path for headers it accepted
    # before must refuse the bad one just as the full validation does.
    assert stub.ModelInfer(infer_request(X), timeout=10).outputs[0].shape == [2, 10]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=10)
    assert caught.value.code().name == code and needle in caught.value.details(), caught.value.details()
    assert stub.ModelInfer(infer_request(X), timeout=10).outputs[0].shape == [2, 10]


def test_metadata_of_unknown_model_is_not_found(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    for call, request in (
        (stub.ModelMetadata, pb.ModelMetadataRequest(name="x")),
        (stub.ModelConfig, pb.ModelConfigRequest(name="x")),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call(request)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_typed_api_and_oip_share_one_batcher_and_statistics_match_metrics(classify_server: ServiceProcess) -> None:
    async def mixed() -> list[object]:
        async with grpc.aio.insecure_channel(classify_server.address) as channel:
            oip = pb_grpc.GRPCInferenceServiceStub(channel)
            typed = classify_pb2_grpc.ClassifyServiceStub(channel)
            typed_request = classify_pb2.ClassifyRequest(tensor=tensor_message(np.zeros((1, 28, 28), np.uint8)))
            calls = [oip.ModelInfer(infer_request(X[:1]), timeout=10) for _ in range(32)]
            calls += [typed.Classify(typed_request, timeout=10) for _ in range(32)]
            return await asyncio.gather(*calls)

    asyncio.run(mixed())
    with grpc.insecure_channel(classify_server.address) as channel:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(pb.ModelStatisticsRequest(name="classifier"))
        text = classify_server.metrics_text()
    (s,) = stats.model_stats
    assert s.name == "classifier" and s.version == "2"
    assert s.inference_count == metric_value(text, "nnserve_model_inference_rows_total")
    assert s.execution_count == metric_value(text, "nnserve_model_executions_total")
    assert s.execution_count < s.inference_count  # batches formed across the two APIs
    assert sum(b.compute_infer.count for b in s.batch_stats) == s.execution_count
    assert sum(b.batch_size * b.compute_infer.count for b in s.batch_stats) == s.inference_count
    assert s.inference_stats.success.count >= 64 and s.inference_stats.queue.count >= 64
    assert s.inference_stats.compute_infer.ns > 0 and s.last_inference > 0
    assert (
        metric_value(
            text,
            "nnserve_grpc_requests_total",
            grpc_service="inference.GRPCInferenceService",
            grpc_method="ModelInfer",
            grpc_code="OK",
        )
        >= 32
    )
