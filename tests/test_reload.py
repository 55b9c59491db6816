"""Hot reload: new versions swap in under load with no failed request; bad versions are rejected."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from pathlib import Path

import grpc
import numpy as np

from services.client import tensor_message
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc
from tests.helpers import ServiceProcess, make_tiny_classifier, metric_value, start_service

REQUEST = classify_pb2.ClassifyRequest(tensor=tensor_message(np.zeros((1, 28, 28), np.uint8)))


async def load_until(address: str, done: asyncio.Event, callers: int = 8) -> tuple[list[int], list[str]]:
    """Closed-loop load; returns the versions that answered, in order, and any error codes."""
    versions: list[int] = []
    failures: list[str] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = classify_pb2_grpc.ClassifyServiceStub(channel)

        async def caller() -> None:
            while not done.is_set():
                try:
                    versions.append((await stub.Classify(REQUEST, timeout=10)).model_version)
                except grpc.aio.AioRpcError as exc:
                    failures.append(exc.code().name)

        await asyncio.gather(*(caller() for _ in range(callers)))
    return versions, failures


def wait_for(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def reloads(server: ServiceProcess, result: str) -> float:
    return metric_value(server.metrics_text(), "nnserve_model_reloads_total", result=result)


def test_new_version_swaps_in_under_load_without_a_failed_request(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    make_tiny_classifier(repo, version=1, seed=1)
    server = start_service("services.classify", repo, tmp_path / "run", "--model-poll-interval-s", "0.2")
    try:

        async def scenario() -> tuple[list[int], list[str]]:
            done = asyncio.Event()
            load = asyncio.ensure_future(load_until(server.address, done))
            await asyncio.sleep(0.5)
            await asyncio.get_running_loop().run_in_executor(None, make_tiny_classifier, repo, 2, "classifier", 2)
            await asyncio.get_running_loop().run_in_executor(None, wait_for, lambda: reloads(server, "loaded") == 1)
            await asyncio.sleep(0.5)
            done.set()
            return await load

        versions, failures = asyncio.run(scenario())
        assert failures == []
        assert versions[0] == 1 and versions[-1] == 2 and len(versions) > 50
        switch = versions.index(2)
        assert set(versions[switch + 16 :]) == {2}  # after the swap (and the 8 in-flight calls), only v2 answers
        text = server.metrics_text()
        assert (
            metric_value(text, "nnserve_model_info", version="2") == 1
            and metric_value(text, "nnserve_model_info", version="1") == 0
        )
    finally:
        assert server.stop() == 0


def test_corrupt_or_mismatched_versions_are_rejected_and_the_old_one_keeps_serving(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    make_tiny_classifier(repo, version=1)
    server = start_service("services.classify", repo, tmp_path / "run", "--model-poll-interval-s", "0.2")
    try:
        # v2: the file does not match its manifest's checksum
        make_tiny_classifier(repo, version=2)
        (repo / "classifier" / "2" / "model.onnx").write_bytes(b"corrupt")
        wait_for(lambda: reloads(server, "rejected") == 1)
        # v3: a valid model whose manifest declares different inputs
        v3 = make_tiny_classifier(repo, version=3)
        manifest = json.loads((v3 / "manifest.json").read_text())
        manifest["outputs"][0]["shape"] = [-1, 5]
        (v3 / "manifest.json").write_text(json.dumps(manifest))
        wait_for(lambda: reloads(server, "rejected") == 2)
        with grpc.insecure_channel(server.address) as channel:
            assert classifier_version(channel) == 1
        log = server.log()
        assert "reload of classifier version 2 rejected" in log and "sha256" in log
        assert "reload of classifier version 3 rejected" in log
        time.sleep(0.6)
        assert reloads(server, "rejected") == 2, "a rejected version is not retried on every poll"
    finally:
        assert server.stop() == 0


def classifier_version(channel: grpc.Channel) -> int:
    return classify_pb2_grpc.ClassifyServiceStub(channel).Classify(REQUEST, timeout=10).model_version


def test_sighup_reloads_when_polling_is_off(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    make_tiny_classifier(repo, version=1)
    server = start_service("services.classify", repo, tmp_path / "run", "--model-poll-interval-s", "0")
    try:
        make_tiny_classifier(repo, version=2, seed=9)
        time.sleep(0.3)
        with grpc.insecure_channel(server.address) as channel:
            assert classifier_version(channel) == 1
            server.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: classifier_version(channel) == 2)
        shutil.rmtree(repo / "classifier" / "2")  # removing a version never unloads the serving one
    finally:
        assert server.stop() == 0


def test_a_version_copied_in_two_steps_loads_once_complete(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    make_tiny_classifier(repo, version=1)
    staging = make_tiny_classifier(tmp_path / "staging", version=2, seed=4)
    server = start_service("services.classify", repo, tmp_path / "run", "--model-poll-interval-s", "0.2")
    try:
        target = repo / "classifier" / "2"
        target.mkdir()
        shutil.copy(staging / "model.onnx", target / "model.onnx")  # the manifest is not there yet
        wait_for(lambda: reloads(server, "rejected") >= 1)
        shutil.copy(staging / "manifest.json", target / "manifest.json")
        with grpc.insecure_channel(server.address) as channel:
            wait_for(lambda: classifier_version(channel) == 2)
    finally:
        assert server.stop() == 0
