"""Overload, soak, shutdown under load and rolling restarts, against real service processes."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.classify.settings import ClassifySettings
from services.client import tensor_message
from services.loadtest import add_arguments
from services.loadtest import run as run_load
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc
from tests.helpers import metric_value, save_classifier, start_service

pytestmark = pytest.mark.slow
REQUEST = classify_pb2.ClassifyRequest(tensor=tensor_message(np.zeros((1, 28, 28), np.uint8)))


def make_slow_classifier(repository: Path, layers: int = 200) -> None:
    """A classifier that costs about 200M multiply-adds per image, so overload is reachable at a rate
    a Python client can offer without becoming the bottleneck itself."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Flatten", ["image"], ["h0"], axis=1), helper.make_node("MatMul", ["h0", "W_in"], ["a0"])]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"a{i}", "W"], [f"a{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"a{layers}", "W_out"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "slow_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[
            numpy_helper.from_array((rng.normal(0, 0.03, (784, 1024))).astype(np.float32), "W_in"),
            numpy_helper.from_array((np.eye(1024) * 0.999).astype(np.float32), "W"),
            numpy_helper.from_array((rng.normal(0, 0.03, (1024, 10))).astype(np.float32), "W_out"),
        ],
    )
    save_classifier(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), repository)


def settled_stats(pid: int, samples: int = 5, interval: float = 0.2) -> dict[str, int]:
    """The least of each figure over a few samples: a descriptor or thread that exists for an
    instant (a connection being closed, a pool thread retiring) is not a leak."""
    taken = []
    for _ in range(samples):
        taken.append(proc_stats(pid))
        time.sleep(interval)
    return {key: min(s[key] for s in taken) for key in taken[0]}


# A leak grows with the request count (here 100,000 requests); a handful of descriptors or threads
# that come and go with the machine's load does not.
FD_THREAD_TOLERANCE = 4


def proc_stats(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_kb": int(fields["VmRSS"].split()[0]),
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def load_args(address: str, **overrides: object) -> argparse.Namespace:
    """`nnserve loadtest` arguments: its own defaults, quiet, with ``overrides``."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([address, "--quiet"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_overload_sheds_fast_and_keeps_admitted_latency_bounded(tmp_path: Path) -> None:
    make_slow_classifier(tmp_path / "repo")
    server = start_service(
        "services.classify",
        tmp_path / "repo",
        tmp_path / "run",
        "--intra-op-threads",
        "1",
        "--max-queue-wait-ms",
        "100",
    )
    try:
        sustainable = run_load(load_args(server.address, concurrency=16, duration=2.0))
        capacity = sustainable["requests_per_s"]
        before = proc_stats(server.proc.pid)
        overload = run_load(load_args(server.address, rate=3 * capacity, duration=4.0, warmup=0.5))
        during = proc_stats(server.proc.pid)
        recovered = run_load(load_args(server.address, concurrency=2, duration=1.0, warmup=0.2))
        report = {
            "capacity_req_s": capacity,
            "overload": overload,
            "rss_growth_kb": during["rss_kb"] - before["rss_kb"],
        }
        print(json.dumps(report, indent=2))
        shed = overload["errors"].get("RESOURCE_EXHAUSTED", 0)
        assert shed > 0, "3x the sustainable rate shed nothing"
        assert set(overload["errors"]) <= {"RESOURCE_EXHAUSTED"}
        assert overload["ok"] > 0.5 * capacity * 4  # it kept serving at about its capacity
        # Without shedding the queue grows by twice the capacity a second, so admitted calls would
        # wait seconds (about 8 s by the end; a full queue of 1,024 is 7 s of work even at a quiet
        # machine's capacity). With it, one waits at most max_queue_wait_ms (0.1 s), the batch
        # running when it arrived and its own: up to max_batch_size rows each (64) at the measured
        # capacity, and the transport and the client. Measured, not assumed: a loaded machine's
        # slower model moves the bound with it. The bound allows twice that (0.5 s and four
        # batches): the capacity is measured in 2 s before the overload's 4 s, and with a training
        # run on the other core the server was slower in the second window than in the first (p99
        # 1.2 s against a bound of 0.9 s). That is still several times below an unshed queue's wait.
        batch = ClassifySettings.model_fields["max_batch_size"].default  # the server runs with it
        bound = 1000 * (0.5 + 4 * batch / capacity)
        assert overload["latency_ms"]["p99"] < bound, f"admitted requests' p99 is not bounded (bound {bound:.0f} ms)"
        assert overload["error_latency_ms"]["p50"] < 100, "refusals are not fast"
        assert during["rss_kb"] - before["rss_kb"] < 100_000, "memory grew under overload"
        assert recovered["errors"] == {} and recovered["ok"] > 0
    finally:
        assert server.stop() == 0


def test_soak_100k_requests_without_growth(tiny_repository: Path, tmp_path: Path) -> None:
    server = start_service("services.classify", tiny_repository, tmp_path)
    try:
        run_load(load_args(server.address, concurrency=32, requests=10_000, duration=120, warmup=0))
        warm = settled_stats(server.proc.pid)
        report = run_load(load_args(server.address, concurrency=32, requests=100_000, duration=600, warmup=0))
        end = settled_stats(server.proc.pid)
        growth = (end["rss_kb"] - warm["rss_kb"]) / warm["rss_kb"]
        print(json.dumps({"soak": report, "warm": warm, "end": end, "rss_growth": round(growth, 4)}, indent=2))
        assert report["ok"] == 100_000 and report["errors"] == {}
        assert growth < 0.10, f"RSS grew {growth:.1%} over 100k requests"
        assert end["fds"] <= warm["fds"] + FD_THREAD_TOLERANCE, (warm, end)
        assert end["threads"] <= warm["threads"] + FD_THREAD_TOLERANCE, (warm, end)
    finally:
        assert server.stop() == 0


async def _load_while(  # type: ignore[no-untyped-def]
    address: str, action, seconds: float, options=None, callers: int = 16, pause: float = 0.01
) -> tuple[int, dict[str, int]]:
    """Closed-loop load for ``seconds``, running ``action`` halfway; returns (ok, other codes).

    A caller that gets an error waits ``pause`` before its next call."""
    codes: dict[str, int] = {}
    ok = 0
    stop = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address, options=options or []) as channel:
        stub = classify_pb2_grpc.ClassifyServiceStub(channel)

        async def caller() -> None:
            nonlocal ok
            while time.monotonic() < stop:
                try:
                    await stub.Classify(REQUEST, timeout=10)
                    ok += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                    await asyncio.sleep(pause)

        async def act() -> None:
            await asyncio.sleep(seconds / 2)
            action()

        await asyncio.gather(act(), *(caller() for _ in range(callers)))
    return ok, codes


def test_sigterm_under_load_completes_every_accepted_request(tiny_repository: Path, tmp_path: Path) -> None:
    server = start_service("services.classify", tiny_repository, tmp_path, "--grace-period-s", "10")
    started = []

    def terminate() -> None:
        started.append(time.monotonic())
        server.proc.send_signal(signal.SIGTERM)

    # 64 callers that retry after 1 ms: nearly every caller has a call in transit at any moment.
    # Before calls refused while draining were held until the close, gRPC cancelled ~60 of them
    # (CANCELLED) at the close: they had reached its core but not yet the application.
    ok, codes = asyncio.run(_load_while(server.address, terminate, 2.0, callers=64, pause=0.001))
    assert server.proc.wait(timeout=15) == 0
    assert ok > 100
    # The server's own count at exit: every call that reached it either completed or was refused
    # with UNAVAILABLE; none was cut off. And every caller saw OK or UNAVAILABLE, nothing else.
    line = next(x for x in server.log().splitlines() if "stopped; calls by method and code:" in x)
    served = json.loads(line.split("calls by method and code: ", 1)[1])["nnserve.v1.ClassifyService/Classify"]
    assert set(served) <= {"OK", "UNAVAILABLE"}, served
    assert served["OK"] == ok, (served, ok)
    assert set(codes) <= {"UNAVAILABLE"}, codes


def test_rolling_restart_behind_round_robin_loses_no_request(tiny_repository: Path, tmp_path: Path) -> None:
    first = start_service("services.classify", tiny_repository, tmp_path / "a")
    second = start_service("services.classify", tiny_repository, tmp_path / "b")
    try:
        target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
        from services.client import channel_options

        options = channel_options(round_robin=True, retry=True)

        def restart_first() -> None:
            first.proc.send_signal(signal.SIGTERM)

        ok, codes = asyncio.run(_load_while(target, restart_first, 3.0, options))
        assert first.proc.wait(timeout=15) == 0
        assert codes == {}, codes
        assert ok > 100
        assert metric_value(second.metrics_text(), "nnserve_grpc_requests_total", grpc_code="OK") > 0
    finally:
        second.stop()
