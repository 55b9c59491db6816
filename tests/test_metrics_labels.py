"""The metrics' labels as operators slice them, read from a real service's /metrics endpoint.

gRPC series carry grpc_type, grpc_service, grpc_method and grpc_code (as go-grpc-prometheus and
py-grpc-prometheus label theirs); health and reflection calls are counted but kept out of the
latency histogram; unknown methods are counted under one 'unknown' series; per-model series carry
the version, so a reload's two versions stay apart; no ``_created`` series.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.client import tensor_message
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc
from tests.helpers import ServiceProcess, make_tiny_classifier, metric_value, start_service

CLASSIFY = {"grpc_service": "nnserve.v1.ClassifyService", "grpc_method": "Classify"}
HEALTH = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Check"}
REQUEST = classify_pb2.ClassifyRequest(tensor=tensor_message(np.zeros((1, 28, 28), np.uint8)))


def label_sets(text: str, name: str) -> list[dict[str, str]]:
    return [s.labels for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def test_grpc_series_are_labelled_by_service_method_type_and_code(classify_server: ServiceProcess) -> None:
    before = classify_server.metrics_text()
    with grpc.insecure_channel(classify_server.address) as channel:
        stub = classify_pb2_grpc.ClassifyServiceStub(channel)
        stub.Classify(REQUEST, timeout=10)
        with pytest.raises(grpc.RpcError) as bad:
            stub.Classify(classify_pb2.ClassifyRequest(), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = classify_server.metrics_text()

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("nnserve_grpc_requests_total", grpc_type="unary", **CLASSIFY, grpc_code="OK") == 1
    assert delta("nnserve_grpc_requests_total", grpc_type="unary", **CLASSIFY, grpc_code="INVALID_ARGUMENT") == 1
    assert delta("nnserve_grpc_request_duration_seconds_count", grpc_type="unary", **CLASSIFY) == 2
    for labels in label_sets(after, "nnserve_grpc_requests_total"):
        assert set(labels) == {"service", "grpc_type", "grpc_service", "grpc_method", "grpc_code"}, labels
        assert "method" not in labels and "code" not in labels


def test_health_and_reflection_are_counted_but_not_timed(classify_server: ServiceProcess) -> None:
    """Health checks and reflection streams stay out of the latency histogram (and in-flight gauge),
    so a p99 is the served calls' p99; the request counter still counts them."""
    before = classify_server.metrics_text()
    with grpc.insecure_channel(classify_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(3):
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1  # SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        asked = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        replies = list(reflection.ServerReflectionInfo(asked))
        assert "nnserve.v1.ClassifyService" in [s.name for s in replies[0].list_services_response.service]
    after = classify_server.metrics_text()
    ok = {"grpc_code": "OK"}
    assert (
        metric_value(after, "nnserve_grpc_requests_total", **HEALTH, **ok)
        - metric_value(before, "nnserve_grpc_requests_total", **HEALTH, **ok)
        == 3
    )
    reflection_labels = {"grpc_service": "grpc.reflection.v1alpha.ServerReflection", "grpc_type": "bidi_stream"}
    assert metric_value(after, "nnserve_grpc_requests_total", **reflection_labels, **ok) >= 1
    timed = {labels["grpc_service"] for labels in label_sets(after, "nnserve_grpc_request_duration_seconds_count")}
    assert not timed & {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}, timed


def test_http_health_probes_are_counted_but_not_timed(classify_server: ServiceProcess) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/classifier/ready"):
        with urllib.request.urlopen(f"{classify_server.http_url}{path}", timeout=10) as reply:
            assert reply.status == 200
    text = classify_server.metrics_text()
    for route in ("GET /v2/health/live", "GET /v2/health/ready"):
        assert metric_value(text, "nnserve_http_requests_total", route=route, code="200") >= 1
        assert not [s for s in label_sets(text, "nnserve_http_request_duration_seconds_count") if s["route"] == route]
    model_ready = "GET /v2/models/{model}/ready"
    assert metric_value(text, "nnserve_http_request_duration_seconds_count", route=model_ready) >= 1


def test_unknown_methods_are_counted_in_one_series(classify_server: ServiceProcess) -> None:
    labels = {"grpc_service": "unknown", "grpc_method": "unknown", "grpc_code": "UNIMPLEMENTED"}
    before = metric_value(classify_server.metrics_text(), "nnserve_grpc_requests_total", **labels)
    with grpc.insecure_channel(classify_server.address) as channel:
        for path in ("/nnserve.v1.Nothing/Here", "/x/y", "/nnserve.v1.ClassifyService/Nope"):
            with pytest.raises(grpc.RpcError) as missing:
                channel.unary_unary(path)(b"", timeout=10)
            assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
    text = classify_server.metrics_text()
    assert metric_value(text, "nnserve_grpc_requests_total", **labels) - before == 3
    assert not any("Nothing" in str(s) or "Nope" in str(s) for s in label_sets(text, "nnserve_grpc_requests_total"))


def test_no_created_series_and_model_series_carry_the_version(classify_server: ServiceProcess) -> None:
    with grpc.insecure_channel(classify_server.address) as channel:
        classify_pb2_grpc.ClassifyServiceStub(channel).Classify(REQUEST, timeout=10)
    text = classify_server.metrics_text()
    assert "_created" not in text
    per_model = [
        "nnserve_model_inference_rows_total",
        "nnserve_model_executions_total",
        "nnserve_batch_size_rows_count",
        "nnserve_batch_queue_wait_seconds_count",
        "nnserve_model_inference_duration_seconds_count",
        "nnserve_batch_queue_depth_requests",
    ]
    for name in per_model:
        found = label_sets(text, name)
        assert found, name
        assert all(labels.get("model") == "classifier" and labels.get("version") == "2" for labels in found), (
            name,
            found,
        )
    assert metric_value(text, "nnserve_model_executions_total", model="classifier", version="2") >= 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_the_exposition_passes_promtool(classify_server: ServiceProcess) -> None:
    """`promtool check metrics`: names, units, counter suffixes and help texts as Prometheus wants them."""
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=classify_server.metrics_text(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_reload_keeps_the_two_versions_series_apart(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    make_tiny_classifier(repo, version=1, seed=1)
    server = start_service("services.classify", repo, tmp_path / "run", "--model-poll-interval-s", "0.2")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = classify_pb2_grpc.ClassifyServiceStub(channel)
            assert stub.Classify(REQUEST, timeout=10).model_version == 1
            make_tiny_classifier(repo, version=2, seed=2)
            deadline = time.monotonic() + 60
            while metric_value(server.metrics_text(), "nnserve_model_reloads_total", result="loaded") < 1:
                assert time.monotonic() < deadline, "version 2 was never loaded"
                time.sleep(0.1)
            assert stub.Classify(REQUEST, timeout=10).model_version == 2
            assert stub.Classify(REQUEST, timeout=10).model_version == 2
        text = server.metrics_text()
        assert metric_value(text, "nnserve_model_reloads_total", version="2", result="loaded") == 1
        assert metric_value(text, "nnserve_model_executions_total", model="classifier", version="1") >= 1
        assert metric_value(text, "nnserve_model_executions_total", model="classifier", version="2") >= 2
    finally:
        assert server.stop() == 0
