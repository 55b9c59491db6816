"""google.rpc rich error details beside the status message, from real service processes: decoded with
``grpc_status.rpc_status.from_call`` for each code, in the HTTP error bodies, and on the client's
exception."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.client import ClassifyClient, GenerateClient, RpcError
from services.proto.inference import grpc_service_pb2 as oip_pb
from services.proto.inference import grpc_service_pb2_grpc as oip_grpc
from services.proto.nnserve.v1 import generate_pb2, generate_pb2_grpc
from tests.helpers import ServiceProcess, start_service

pytestmark = pytest.mark.timeout(300)

MAX_ROWS_IN_FLIGHT = 8


@pytest.fixture(scope="module")
def generator(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """Generate with a small row budget, so a 9-image diffusion request is shed whatever the load."""
    server = start_service(
        "services.generate",
        tiny_repository,
        tmp_path_factory.mktemp("details"),
        "--max-count",
        "16",
        "--max-rows-in-flight",
        str(MAX_ROWS_IN_FLIGHT),
    )
    yield server
    server.stop()


def status_of(error: grpc.RpcError) -> status_pb2.Status:
    """The google.rpc.Status of a failed call (from_call checks its code and message match the call's)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no details on {error}"
    return status


def detail(status: status_pb2.Status, cls: type[Message]) -> Any:
    found = [d for d in status.details if d.Is(cls.DESCRIPTOR)]
    assert len(found) == 1, f"{cls.DESCRIPTOR.full_name}: {len(found)} in {status}"
    message = cls()
    found[0].Unpack(message)
    return message


def generate_raw(server: ServiceProcess, **fields: Any) -> grpc.RpcError:
    """The error of a Generate call made with the plain stub (no client wrapping)."""
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            generate_pb2_grpc.GenerateServiceStub(channel).Generate(generate_pb2.GenerateRequest(**fields), timeout=30)
    return caught.value


@pytest.mark.parametrize(
    ("fields", "field", "description"),
    [
        (dict(count=17), "count", "17 is out of range (1..16)"),
        (dict(count=2, labels=[12]), "labels[0]", "12 is out of range (classes are 0..9)"),
        (
            dict(model=generate_pb2.GENERATOR_MODEL_DIFFUSION, count=1, diffusion=dict(steps=5000)),
            "diffusion.steps",
            "5000 is out of range (1..1000)",
        ),
    ],
)
def test_invalid_argument_has_a_field_violation(
    generator: ServiceProcess, fields: dict[str, Any], field: str, description: str
) -> None:
    error = generate_raw(generator, **fields)
    # A range that does not depend on the server's state: INVALID_ARGUMENT, not OUT_OF_RANGE.
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"{field}: {description}"  # type: ignore[attr-defined]
    status = status_of(error)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    violations = detail(status, error_details_pb2.BadRequest).field_violations
    assert [(v.field, v.description, v.reason) for v in violations] == [(field, description, "VALUE_OUT_OF_RANGE")]
    info = detail(status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain, info.metadata["field"]) == ("VALUE_OUT_OF_RANGE", "nnserve", field)


def test_invalid_input_from_the_classifier(classify_server: ServiceProcess) -> None:
    with ClassifyClient(classify_server.address) as client:
        with pytest.raises(RpcError) as caught:
            client.classify(tensor=np.zeros((1, 28, 28), np.uint8), top_k=11, timeout=30)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_INPUT"
    assert [v.field for v in error.field_violations] == ["top_k"]
    assert "got 11" in error.field_violations[0].description and error.details().startswith("top_k: ")


def test_resource_exhausted_has_quota_failure_and_retry_info(generator: ServiceProcess) -> None:
    error = generate_raw(generator, model=generate_pb2.GENERATOR_MODEL_DIFFUSION, count=MAX_ROWS_IN_FLIGHT + 1)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = status_of(error)
    violation = detail(status, error_details_pb2.QuotaFailure).violations[0]
    assert (violation.subject, violation.quota_id) == ("model diffusion_denoiser", "max_rows_in_flight")
    assert f"max_rows_in_flight={MAX_ROWS_IN_FLIGHT}" in violation.description
    retry = detail(status, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToNanoseconds() > 0
    assert detail(status, error_details_pb2.ErrorInfo).reason == "OVERLOADED"
    # The client's exception has them decoded.
    with GenerateClient(generator.address) as client:
        with pytest.raises(RpcError) as caught:
            client.generate(model="diffusion", count=MAX_ROWS_IN_FLIGHT + 1, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.retry_delay_s == retry.retry_delay.ToNanoseconds() / 1e9
    assert [v.quota_id for v in caught.value.quota_violations] == ["max_rows_in_flight"]
    assert "retry in" in caught.value.explain()


@pytest.mark.parametrize(
    ("name", "version", "resource_type", "resource_name"),
    [
        ("nope", "", "nnserve.model", "nope"),
        ("classifier", "9", "nnserve.model_version", "classifier/9"),
        ("m" * 100_000, "", "nnserve.model", None),  # echoed input is cut: gRPC caps the trailer
    ],
)
def test_not_found_has_resource_info(
    classify_server: ServiceProcess, name: str, version: str, resource_type: str, resource_name: str | None
) -> None:
    with grpc.insecure_channel(classify_server.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelMetadata(oip_pb.ModelMetadataRequest(name=name, version=version), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    status = status_of(caught.value)
    resource = detail(status, error_details_pb2.ResourceInfo)
    assert resource.resource_type == resource_type
    if resource_name is not None:
        assert resource.resource_name == resource_name
    else:
        assert resource.resource_name.startswith("mmm") and len(resource.resource_name) <= 128
    info = detail(status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("MODEL_NOT_FOUND", "nnserve")


def test_unexpected_and_transport_errors_have_no_domain_details(classify_server: ServiceProcess) -> None:
    """UNIMPLEMENTED (no such method) says nothing nnserve-specific; the status is unchanged."""
    with grpc.insecure_channel(classify_server.address) as channel:
        call = channel.unary_unary("/nnserve.v1.NoSuchService/Nothing")
        with pytest.raises(grpc.RpcError) as caught:
            call(b"", timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert rpc_status.from_call(caught.value) is None  # type: ignore[arg-type]


def http_error(server: ServiceProcess, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.http_url + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    return caught.value.code, json.loads(caught.value.read())


def by_type(details: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [d for d in details if d["@type"] == f"type.googleapis.com/google.rpc.{name}"]
    assert len(found) == 1, details
    return found[0]


def test_http_error_bodies_carry_the_details(generator: ServiceProcess, classify_server: ServiceProcess) -> None:
    status, body = http_error(generator, "POST", "/v1/generate", {"count": 17})
    assert status == 400 and body["error"] == "count: 17 is out of range (1..16)"
    violations = by_type(body["details"], "BadRequest")["fieldViolations"]
    expected = {"field": "count", "description": "17 is out of range (1..16)", "reason": "VALUE_OUT_OF_RANGE"}
    assert violations == [expected]
    status, body = http_error(
        generator, "POST", "/v1/generate", {"model": "GENERATOR_MODEL_DIFFUSION", "count": MAX_ROWS_IN_FLIGHT + 1}
    )
    quota = by_type(body["details"], "QuotaFailure")["violations"][0]
    assert status == 429 and quota["quotaId"] == "max_rows_in_flight"
    assert by_type(body["details"], "RetryInfo")["retryDelay"].endswith("s")
    status, body = http_error(classify_server, "GET", "/v2/models/nope/ready")
    assert status == 404 and by_type(body["details"], "ResourceInfo")["resourceName"] == "nope"
    assert by_type(body["details"], "ErrorInfo") == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "MODEL_NOT_FOUND",
        "domain": "nnserve",
        "metadata": {"model": "nope"},
    }
    status, body = http_error(classify_server, "GET", "/no/such/route")
    assert status == 404 and set(body) == {"error"}  # not a domain error: no details


def test_a_full_queue_says_when_it_drains() -> None:
    """The batcher's Overloaded names its limit and model and estimates the queue's model time
    (queued rows x the measured time per row), which RetryInfo carries."""
    import asyncio
    import threading

    from services.core import error_details, errors
    from services.core.batching import DynamicBatcher

    release = threading.Event()

    def predict(inputs: Any) -> dict[str, np.ndarray]:
        release.wait(30)
        return {"y": np.asarray(inputs["x"]) * 2}

    async def scenario() -> errors.Overloaded:
        batcher = DynamicBatcher(predict, name="m", max_batch_size=4, max_delay_s=0.0, max_queue_size=1)
        batcher.start()
        try:
            release.set()
            await batcher.submit({"x": np.ones((2, 1), np.float32)})  # measures the time per row
            release.clear()
            taken = batcher.stats.queue_count
            running = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 1), np.float32)}))
            while batcher.stats.queue_count == taken:  # until it has left the queue for the model
                await asyncio.sleep(0.01)
            queued = asyncio.ensure_future(batcher.submit({"x": np.ones((3, 1), np.float32)}))
            await asyncio.sleep(0)
            with pytest.raises(errors.Overloaded) as caught:
                await batcher.submit({"x": np.ones((1, 1), np.float32)})
            release.set()
            await asyncio.gather(running, queued)
            return caught.value
        finally:
            release.set()
            await batcher.stop()

    error = asyncio.run(scenario())
    assert (error.limit, error.subject) == ("max_queue_size", "model m")
    assert error.retry_after_s is not None and error.retry_after_s > 0
    details = error_details.details_for(error)
    retry = next(d for d in details if isinstance(d, error_details_pb2.RetryInfo))
    assert retry.retry_delay.ToNanoseconds() == int(error.retry_after_s * 1e9)


def test_unauthenticated_says_only_that(tiny_repository: Path, tmp_path: Path) -> None:
    """UNAUTHENTICATED carries an ErrorInfo with its reason and nothing about the server's models."""
    token_file = tmp_path / "token"
    token_file.write_text("a-token-for-the-details-test\n")
    server = start_service("services.classify", tiny_repository, tmp_path / "run", "--auth-token-file", str(token_file))
    try:
        with ClassifyClient(server.address) as client, pytest.raises(RpcError) as caught:
            client.classify(tensor=np.zeros((1, 28, 28), np.uint8), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        status = status_of(caught.value)
        info = detail(status, error_details_pb2.ErrorInfo)
        assert (info.reason, info.domain, dict(info.metadata)) == ("UNAUTHENTICATED", "nnserve", {})
        assert len(status.details) == 1
    finally:
        server.stop()
