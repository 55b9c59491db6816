"""The classify service serving the standard and the robust classifier side by side (issue #18).

A request picks its model with ``model_name``; '' is the standard one. Real processes, real channels.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from services.client import ClassifyClient, tensor_message
from services.proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from services.proto.nnserve.v1 import classify_pb2
from tests.helpers import ROOT, ServiceProcess, make_tiny_classifier, start_service
from tests.test_classify_service import probs_of, reference_probabilities, sample_images


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two different tiny classifiers: the standard one (versions 1, 2) and a robust one."""
    root = tmp_path_factory.mktemp("two-classifiers")
    make_tiny_classifier(root, version=1, seed=1)
    make_tiny_classifier(root, version=2, seed=2)
    make_tiny_classifier(root, version=1, name="classifier_robust", seed=3)
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    service = start_service("services.classify", repository, tmp_path_factory.mktemp("classify"))
    yield service
    assert service.stop() == 0


def probabilities(reply: object) -> np.ndarray:
    return np.array([[p[c] for c in range(10)] for p in probs_of(reply)])  # type: ignore[arg-type]


def test_each_request_gets_the_model_it_names(server: ServiceProcess, repository: Path) -> None:
    images = sample_images(3)
    pixels = images.astype(np.float32)[:, None] / 255.0
    with ClassifyClient(server.address) as client:
        standard = client.classify(tensor=images, top_k=10)
        robust = client.classify(tensor=images, top_k=10, model_name="classifier_robust")
        named = client.classify(tensor=images, top_k=10, model_name="classifier")
    assert (standard.model_name, standard.model_version) == ("classifier", 2)
    assert (named.model_name, named.model_version) == ("classifier", 2)
    assert (robust.model_name, robust.model_version) == ("classifier_robust", 1)
    np.testing.assert_allclose(probabilities(standard), reference_probabilities(repository, 2, pixels), atol=1e-6)
    logits = ort.InferenceSession(str(repository / "classifier_robust" / "1" / "model.onnx")).run(
        None, {"image": pixels}
    )[0]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(probabilities(robust), expected, atol=1e-6)
    assert not np.allclose(probabilities(robust), probabilities(standard), atol=1e-3)  # two different models


def test_unknown_model_name_is_not_found_and_lists_the_served_ones(server: ServiceProcess) -> None:
    with ClassifyClient(server.address) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.classify(tensor=sample_images(1), model_name="resnet")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "model_name" in caught.value.details() and "classifier_robust" in caught.value.details()
        # the version check applies to the model the request names: the robust one has no version 2
        request = classify_pb2.ClassifyRequest(
            tensor=tensor_message(sample_images(1)), model_name="classifier_robust", model_version=2
        )
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.Classify(request)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "model_version" in caught.value.details()
        assert client.classify(tensor=sample_images(1)).model_name == "classifier"  # still serving


def test_open_inference_protocol_reaches_both_models(server: ServiceProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for name, version in (("classifier", "2"), ("classifier_robust", "1")):
            assert stub.ModelReady(grpc_service_pb2.ModelReadyRequest(name=name)).ready
            metadata = stub.ModelMetadata(grpc_service_pb2.ModelMetadataRequest(name=name))
            assert metadata.name == name and metadata.versions == [version]


def test_a_repository_without_the_robust_model_serves_the_standard_one_alone(
    tmp_path: Path,
) -> None:
    make_tiny_classifier(tmp_path / "repo", version=1)
    service = start_service("services.classify", tmp_path / "repo", tmp_path / "run")
    try:
        with ClassifyClient(service.address) as client:
            assert client.classify(tensor=sample_images(1)).model_name == "classifier"
            with pytest.raises(grpc.RpcError) as caught:
                client.classify(tensor=sample_images(1), model_name="classifier_robust")
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        assert service.stop() == 0


def test_a_robust_model_named_explicitly_must_exist(tmp_path: Path) -> None:
    make_tiny_classifier(tmp_path / "repo", version=1)
    with pytest.raises(RuntimeError, match="classifier_hardened"):
        start_service("services.classify", tmp_path / "repo", tmp_path / "run", "--robust-model", "classifier_hardened")


def test_the_shipped_repository_serves_both_classifiers(tmp_path: Path) -> None:
    """`nnserve classify --model classifier_robust` against the shipped models."""
    service = start_service("services.classify", ROOT / "models", tmp_path)
    try:
        image = ROOT / "examples" / "images" / "bag.png"
        runs = {}
        for model in ("", "classifier_robust"):
            command = [sys.executable, "-m", "services.cli", "classify", "--address", service.address, "--json"]
            done = subprocess.run(
                [*command, *(["--model", model] if model else []), str(image)],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=120,
                check=True,
            )
            runs[model] = json.loads(done.stdout)
        assert runs[""]["model_name"] == "classifier"
        assert runs["classifier_robust"]["model_name"] == "classifier_robust"
        for reply in runs.values():  # both are good models: the bag is a bag
            assert reply["classifications"][0]["predictions"][0]["label"] == "Bag"
    finally:
        assert service.stop() == 0
