"""Hypothesis-driven fuzzing of every RPC of every service, over real gRPC channels.

Every reply must be a proper status for bad input (never INTERNAL or UNKNOWN), no call may hang,
and the server must answer a normal request afterwards. NNSERVE_FUZZ_EXAMPLES sets the number of
cases per test (default 500).
"""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.client import tensor_message
from services.proto.inference import grpc_service_pb2 as oip_pb
from services.proto.nnserve.v1 import classify_pb2, generate_pb2, restore_pb2, tensor_pb2
from tests.helpers import ServiceProcess

EXAMPLES = int(os.environ.get("NNSERVE_FUZZ_EXAMPLES", "500"))
ALLOWED = {"OK", "INVALID_ARGUMENT", "OUT_OF_RANGE", "NOT_FOUND", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"}
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

PNG_HEADER = b"\x89PNG\r\n\x1a\n"
image_bytes = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda b: PNG_HEADER + b),
    st.binary(max_size=200).map(lambda b: b"\xff\xd8\xff" + b),  # JPEG start
)
dims = st.lists(st.integers(min_value=-3, max_value=3000), max_size=6)
floats = st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.0, float("nan"), float("inf"), -float("inf"), 1e30])


@st.composite
def tensors(draw: st.DrawFn) -> tensor_pb2.Tensor:
    dtype = draw(st.integers(min_value=-2, max_value=5))
    shape = draw(st.one_of(dims, st.sampled_from([[28, 28], [1, 28, 28], [2, 1, 28, 28], [3, 28, 28]])))
    if draw(st.booleans()):
        data = draw(st.binary(max_size=4000))
    else:  # well-sized data of random content, so value checks are reached too
        n = int(np.prod([max(d, 0) for d in shape])) if shape and all(0 <= d <= 64 for d in shape) else 0
        width = 4 if dtype == tensor_pb2.DATA_TYPE_FLOAT32 else 1
        fill = draw(floats)
        data = (
            np.full(n, fill, np.float32).tobytes()
            if width == 4
            else bytes(draw(st.integers(0, 255)) for _ in range(min(n, 1))) * n
        )
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def call(channel: grpc.Channel, method: str, request: bytes, streaming: bool = False) -> str:
    """Send raw bytes to ``method``; return the status code name."""
    try:
        if streaming:
            for _ in channel.unary_stream(method)(request, timeout=20):
                pass
        else:
            channel.unary_unary(method)(request, timeout=20)
        return "OK"
    except grpc.RpcError as exc:
        assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, f"{method} hung"
        return exc.code().name


def check_alive(channel: grpc.Channel, method: str, request: bytes) -> None:
    assert call(channel, method, request) == "OK", "the server stopped answering good requests"


@pytest.fixture(scope="module")
def channels(classify_server: ServiceProcess, restore_server: ServiceProcess, generate_server: ServiceProcess):  # type: ignore[no-untyped-def]
    opened = {
        name: grpc.insecure_channel(s.address)
        for name, s in (("classify", classify_server), ("restore", restore_server), ("generate", generate_server))
    }
    yield opened
    for channel in opened.values():
        channel.close()


GOOD_CLASSIFY = classify_pb2.ClassifyRequest(tensor=tensor_message(np.zeros((1, 28, 28), np.uint8))).SerializeToString()


@FUZZ
@given(
    images=st.lists(image_bytes, max_size=4),
    tensor=st.one_of(st.none(), tensors()),
    top_k=st.integers(0, 2**32 - 1),
    version=st.integers(-(2**63), 2**63 - 1),
)
def test_fuzz_classify(channels, images, tensor, top_k, version) -> None:  # type: ignore[no-untyped-def]
    request = classify_pb2.ClassifyRequest(images=images, top_k=top_k, model_version=version)
    if tensor is not None:
        request.tensor.CopyFrom(tensor)
    code = call(channels["classify"], "/nnserve.v1.ClassifyService/Classify", request.SerializeToString())
    assert code in ALLOWED, code


@FUZZ
@given(
    images=st.lists(image_bytes, max_size=3),
    tensor=st.one_of(st.none(), tensors()),
    masks=st.lists(image_bytes, max_size=3),
    mask_tensor=st.one_of(st.none(), tensors()),
    output=st.integers(-1, 5),
)
def test_fuzz_restore(channels, images, tensor, masks, mask_tensor, output) -> None:  # type: ignore[no-untyped-def]
    request = restore_pb2.RestoreRequest(images=images, masks=masks, output=output)
    if tensor is not None:
        request.tensor.CopyFrom(tensor)
    if mask_tensor is not None:
        request.mask_tensor.CopyFrom(mask_tensor)
    code = call(channels["restore"], "/nnserve.v1.RestoreService/Restore", request.SerializeToString())
    assert code in ALLOWED, code


@FUZZ
@given(
    model=st.integers(-1, 4),
    count=st.integers(0, 40),
    labels=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    output=st.integers(-1, 5),
    sampler=st.integers(-1, 4),
    steps=st.integers(0, 1200),
    eta=floats,
    guidance=st.one_of(st.none(), floats),
    preview=st.integers(0, 5),
    stream=st.booleans(),
)
def test_fuzz_generate(
    channels, model, count, labels, seed, output, sampler, steps, eta, guidance, preview, stream
) -> None:  # type: ignore[no-untyped-def]
    request = generate_pb2.GenerateRequest(model=model, count=count, labels=labels, output=output)
    if seed is not None:
        request.seed = seed
    d = request.diffusion
    d.sampler, d.steps, d.eta, d.preview_every = sampler, min(steps, 40), eta, preview
    if guidance is not None:
        d.guidance_scale = guidance
    method = "/nnserve.v1.GenerateService/GenerateStream" if stream else "/nnserve.v1.GenerateService/Generate"
    code = call(channels["generate"], method, request.SerializeToString(), streaming=stream)
    assert code in ALLOWED, code


@FUZZ
@given(
    model=st.sampled_from(["classifier", "autoencoder", "gan_generator", "diffusion_denoiser", "", "../x", "nope"]),
    version=st.sampled_from(["", "1", "2", "x", "-1"]),
    inputs=st.lists(
        st.tuples(
            st.sampled_from(["image", "mask", "z", "label", "x_t", "t", "other"]),
            st.sampled_from(["FP32", "INT64", "UINT8", "FP16", "BYTES", "", "FP64", "INT8"]),
            dims,
        ),
        max_size=4,
    ),
    raw=st.lists(st.binary(max_size=3200), max_size=4),
    typed=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=50),
    outputs=st.lists(st.sampled_from(["logits", "restored", "image", "eps", "zzz"]), max_size=2),
    server=st.sampled_from(["classify", "restore", "generate"]),
)
def test_fuzz_model_infer(channels, model, version, inputs, raw, typed, outputs, server) -> None:  # type: ignore[no-untyped-def]
    request = oip_pb.ModelInferRequest(model_name=model, model_version=version, id="fuzz")
    for name, datatype, shape in inputs:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if not raw:
            tensor.contents.fp32_contents.extend(typed)
    request.raw_input_contents.extend(raw)
    for name in outputs:
        request.outputs.add(name=name)
    code = call(channels[server], "/inference.GRPCInferenceService/ModelInfer", request.SerializeToString())
    assert code in ALLOWED, code


ALL_UNARY_METHODS = [
    ("classify", "/nnserve.v1.ClassifyService/Classify"),
    ("restore", "/nnserve.v1.RestoreService/Restore"),
    ("generate", "/nnserve.v1.GenerateService/Generate"),
    *[
        (server, f"/inference.GRPCInferenceService/{m}")
        for server in ("classify", "restore", "generate")
        for m in (
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelInfer",
            "ModelConfig",
            "ModelStatistics",
        )
    ],
    *[(server, "/grpc.health.v1.Health/Check") for server in ("classify", "restore", "generate")],
]


@FUZZ
@given(garbage=st.binary(max_size=2000), target=st.sampled_from(ALL_UNARY_METHODS))
def test_fuzz_raw_garbage_on_the_wire(channels, garbage, target) -> None:  # type: ignore[no-untyped-def]
    server, method = target
    code = call(channels[server], method, garbage)
    assert code in ALLOWED, (code, method, garbage[:40])


@FUZZ
@given(
    name=st.one_of(
        st.text(max_size=40),
        st.sampled_from(
            ["classifier", "autoencoder", "gan_generator", "diffusion_denoiser", "../../etc/passwd", "/", "."]
        ),
    ),
    version=st.one_of(st.text(max_size=10), st.sampled_from(["", "1", "2", "99"])),
    method=st.sampled_from(["ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"]),
    server=st.sampled_from(["classify", "restore", "generate"]),
)
def test_fuzz_model_names_and_versions(channels, name, version, method, server) -> None:  # type: ignore[no-untyped-def]
    request = {
        "ModelReady": oip_pb.ModelReadyRequest,
        "ModelMetadata": oip_pb.ModelMetadataRequest,
        "ModelConfig": oip_pb.ModelConfigRequest,
        "ModelStatistics": oip_pb.ModelStatisticsRequest,
    }[method](name=name, version=version)
    code = call(channels[server], f"/inference.GRPCInferenceService/{method}", request.SerializeToString())
    assert code in ALLOWED, code


def test_servers_are_healthy_after_fuzzing(channels) -> None:  # type: ignore[no-untyped-def]
    check_alive(channels["classify"], "/nnserve.v1.ClassifyService/Classify", GOOD_CLASSIFY)
    good_restore = restore_pb2.RestoreRequest(
        tensor=tensor_message(np.zeros((1, 28, 28), np.uint8))
    ).SerializeToString()
    check_alive(channels["restore"], "/nnserve.v1.RestoreService/Restore", good_restore)
    check_alive(
        channels["generate"],
        "/nnserve.v1.GenerateService/Generate",
        generate_pb2.GenerateRequest(count=1, seed=1).SerializeToString(),
    )
