"""nnserve.model.v1.ModelInfo on every service: the model card's facts over gRPC, HTTP, the Open
Inference Protocol's places for them and ``nnserve describe``, from real service processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from services.client import ModelInfoClient, RpcError
from services.core.manifest import Manifest, TrainingInfo, file_sha256
from services.proto.inference import grpc_service_pb2 as oip_pb
from services.proto.inference import grpc_service_pb2_grpc as oip_grpc
from services.proto.nnserve.model.v1 import model_info_pb2, model_info_pb2_grpc
from tests.helpers import ROOT, ServiceProcess, make_tiny_classifier, start_service

pytestmark = pytest.mark.timeout(300)

TRAINING = TrainingInfo(
    command="python -m training.train_classifier --epochs 3 --seed 7",
    seed=7,
    data="Fashion-MNIST train (60,000 images), 5,000 held out",
    epochs=3,
    duration_s=42.5,
    hardware="2 CPU cores (test)",
    torch_version="2.14.1",
    finetuned_from="classifier/0",  # an extra key the training script may add
)
METRICS = {"accuracy": 0.9125, "per_class_accuracy": {"Bag": 0.99}, "confusion_matrix": [[1, 0], [0, 1]]}


@pytest.fixture(scope="module")
def card_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier whose manifest has the provenance and metrics a shipped one has, and an int8 variant."""
    root = tmp_path_factory.mktemp("cards")
    directory = make_tiny_classifier(root, version=1, seed=3)
    manifest = Manifest.read(directory / "manifest.json")
    manifest = manifest.model_copy(update={"training": TRAINING, "metrics": METRICS, "parameters": 7850})
    manifest.write(directory / "manifest.json")
    shutil.copy(directory / "model.onnx", directory / "model.int8.onnx")
    variant = manifest.model_copy(update={"precision": "int8", "file": "model.int8.onnx"})
    variant.write(directory / "manifest.int8.json")
    return root


@pytest.fixture(scope="module")
def server(card_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    process = start_service("services.classify", card_repository, tmp_path_factory.mktemp("describe"))
    yield process
    process.stop()


def http_get(server: ServiceProcess, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(server.http_url + path, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_describe_model_answers_the_manifest(server: ServiceProcess, card_repository: Path) -> None:
    directory = card_repository / "classifier" / "1"
    manifest = Manifest.read(directory / "manifest.json")
    with ModelInfoClient(server.address) as client:
        card = client.describe("classifier", timeout=10)
        assert client.describe(timeout=10) == card  # one model served: the name may be left out
        assert client.describe("classifier", "1", timeout=10) == card
    assert (card.name, card.version, card.task) == ("classifier", "1", manifest.task)
    assert list(card.labels) == manifest.labels and len(card.labels) == 10
    assert card.sha256 == file_sha256(directory / "model.onnx")
    assert (card.parameters, card.precision, list(card.precisions)) == (7850, "fp32", ["fp32", "int8"])
    assert MessageToDict(card.metrics) == METRICS
    training = card.training
    assert (training.command, training.seed, training.data) == (TRAINING.command, 7, TRAINING.data)
    assert (training.hardware, training.epochs, training.duration_s) == (TRAINING.hardware, 3, 42.5)
    assert MessageToDict(training.extra) == {"finetuned_from": "classifier/0"}
    assert [(t.name, t.dtype, list(t.shape)) for t in card.inputs] == [("image", "float32", [-1, 1, 28, 28])]
    assert card.ood.score == manifest.ood.score and card.provider == "CPUExecutionProvider"  # type: ignore[union-attr]


def test_describe_model_errors_carry_details(server: ServiceProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = model_info_pb2_grpc.ModelInfoStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.DescribeModel(model_info_pb2.DescribeModelRequest(name="nope"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "classifier" in caught.value.details()
        status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
        assert status is not None
        resource = error_details_pb2.ResourceInfo()
        assert any(d.Unpack(resource) for d in status.details if d.Is(resource.DESCRIPTOR))
        assert resource.resource_name == "nope"
        with pytest.raises(grpc.RpcError) as caught:
            stub.DescribeModel(model_info_pb2.DescribeModelRequest(name="classifier", version="2"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with ModelInfoClient(server.address) as client:
        with pytest.raises(RpcError) as rich:
            client.describe("classifier", "two", timeout=10)
    assert rich.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [(v.field, v.description) for v in rich.value.field_violations] == [
        ("version", "'two' is not a version number")
    ]


def test_every_service_serves_model_info_and_lists_it_in_reflection(
    server: ServiceProcess, restore_server: ServiceProcess, generate_server: ServiceProcess
) -> None:
    expected = {
        server.address: ["classifier"],
        restore_server.address: ["autoencoder"],
        generate_server.address: ["diffusion_denoiser", "gan_generator"],
    }
    for address, names in expected.items():
        with ModelInfoClient(address) as client:
            cards = client.list(timeout=10)
        assert [c.name for c in cards] == names
        assert all(len(c.sha256) == 64 and c.version == "1" and c.task for c in cards)
        with grpc.insecure_channel(address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
            assert "nnserve.model.v1.ModelInfo" in {s.name for s in reply.list_services_response.service}
    with ModelInfoClient(generate_server.address) as client, pytest.raises(RpcError) as caught:
        client.describe(timeout=10)  # two models: the name is needed
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in caught.value.field_violations] == ["name"]


def test_http_routes_answer_the_same_card(server: ServiceProcess) -> None:
    with ModelInfoClient(server.address) as client:
        card = client.describe("classifier", timeout=10)
    expected = MessageToDict(card, preserving_proto_field_name=True)
    assert http_get(server, "/v1/models/classifier") == (200, expected)
    assert http_get(server, "/v1/models/classifier/versions/1") == (200, expected)
    assert http_get(server, "/v1/models") == (200, {"models": [expected]})
    status, body = http_get(server, "/v1/models/nope")
    assert status == 404 and "unknown model" in body["error"]
    resource = next(d for d in body["details"] if d["@type"].endswith("google.rpc.ResourceInfo"))
    assert resource["resourceName"] == "nope"
    status, body = http_get(server, "/v1/models/classifier/versions/9")
    assert status == 404 and "no version" in body["error"]


def test_open_inference_protocol_carries_the_facts(server: ServiceProcess, card_repository: Path) -> None:
    sha256 = file_sha256(card_repository / "classifier" / "1" / "model.onnx")
    with grpc.insecure_channel(server.address) as channel:
        config = (
            oip_grpc.GRPCInferenceServiceStub(channel)
            .ModelConfig(oip_pb.ModelConfigRequest(name="classifier"), timeout=10)
            .config
        )
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["task"] == "image-classification" and parameters["sha256"] == sha256
    assert parameters["version"] == "1" and parameters["precision"] == "fp32"
    assert parameters["training.seed"] == "7" and parameters["training.command"] == TRAINING.command
    assert json.loads(parameters["metrics"]) == METRICS and len(json.loads(parameters["labels"])) == 10
    status, metadata = http_get(server, "/v2/models/classifier")
    assert status == 200 and metadata["parameters"] == parameters and metadata["versions"] == ["1"]
    status, rest_config = http_get(server, "/v2/models/classifier/config")
    assert status == 200 and {k: v["string_value"] for k, v in rest_config["parameters"].items()} == parameters


def nnserve(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNSERVE_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )


def test_cli_describe(server: ServiceProcess, card_repository: Path) -> None:
    with ModelInfoClient(server.address) as client:
        card = client.describe("classifier", timeout=10)
    expected = MessageToDict(card, preserving_proto_field_name=True)
    done = nnserve("describe", "--address", server.address, "--model", "classifier", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == expected
    done = nnserve("describe", "--address", server.address, "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == {"models": [expected]}, done.stderr
    done = nnserve("describe", "--address", server.address)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith("classifier/1  image-classification  fp32 (variants: fp32, int8)")
    assert card.sha256 in text and TRAINING.command in text and "accuracy 0.9125" in text
    done = nnserve("describe", "--address", server.address, "--model", "nope")
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr and "unknown model" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_card_follows_a_reload(tmp_path: Path) -> None:
    """The facts are the served deployment's: after SIGHUP loads version 2, its checksum and version."""
    repo = tmp_path / "repo"
    make_tiny_classifier(repo, version=1, seed=1)
    server = start_service("services.classify", repo, tmp_path / "run", "--model-poll-interval-s", "0")
    try:
        with ModelInfoClient(server.address) as client:
            assert client.describe("classifier", timeout=10).version == "1"
            make_tiny_classifier(repo, version=2, seed=9)
            server.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while (card := client.describe("classifier", timeout=10)).version != "2":
                assert time.monotonic() < deadline, "version 2 was not loaded"
                time.sleep(0.05)
        assert card.sha256 == file_sha256(repo / "classifier" / "2" / "model.onnx")
    finally:
        assert server.stop() == 0
