"""End to end: the compose deployment on a real Docker engine, driven from the host.

`scripts/docker-e2e.sh` (CI's Docker step, `make e2e-docker`) builds the images on a local
debootstrap base and runs this module with NNSERVE_E2E_COMPOSE=1; without it the module is not
collected (tests/conftest.py). The fixture starts classify, restore, generate and Prometheus with
`docker-compose up`, and always tears them down. Grafana is not started: no Grafana image can be
built offline here; its dashboard is checked against the exported metric names in
tests/test_deploy_config.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.client import ClassifyClient, GenerateClient, RestoreClient, check_health
from services.core.images import encode_png
from services.proto.inference import grpc_service_pb2 as oip
from services.proto.inference import grpc_service_pb2_grpc as oip_grpc
from services.proto.nnserve.v1 import tensor_pb2
from training.data import load_split

ROOT = Path(__file__).resolve().parents[2]
PROJECT = os.environ.get("NNSERVE_E2E_PROJECT", "nnserve-e2e")
PORTS = {"classify": 50051, "restore": 50052, "generate": 50053}
PROMETHEUS = os.environ.get("NNSERVE_E2E_PROMETHEUS", "http://127.0.0.1:9090")
JOBS = {f"nnserve-{s}": s for s in PORTS}
TYPED_METHOD = {
    "classify": "nnserve.v1.ClassifyService/Classify",
    "restore": "nnserve.v1.RestoreService/Restore",
    "generate": "nnserve.v1.GenerateService/Generate",
}


def compose(*args: str, timeout: float = 600) -> str:
    done = subprocess.run(
        ["docker-compose", "-p", PROJECT, "-f", str(ROOT / "compose.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"docker-compose {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def container_health(service: str) -> list[str]:
    ids = compose("ps", "-q", service).split()
    if not ids:
        return []
    out = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Health.Status}}", *ids], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def wait_until(what: str, ready, timeout: float = 120.0, every: float = 1.0):  # type: ignore[no-untyped-def]
    """Poll ``ready()`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = ready()
        except (OSError, RuntimeError, grpc.RpcError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def host_port(service: str, index: int = 1) -> str:
    published = compose("port", "--index", str(index), service, str(PORTS[service])).strip()
    return "127.0.0.1:" + published.rsplit(":", 1)[1]


def prometheus(path: str, **params: str) -> dict:
    url = f"{PROMETHEUS}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]


def query(expr: str) -> dict[str, float]:
    """An instant PromQL query whose result has one series per value of its single `by` label."""
    result = prometheus("/api/v1/query", query=expr)["result"]
    return {next(iter(r["metric"].values()), ""): float(r["value"][1]) for r in result}


def up_targets() -> dict[str, int]:
    counts: dict[str, int] = {}
    for target in prometheus("/api/v1/targets")["activeTargets"]:
        if target["health"] == "up":
            counts[target["labels"]["job"]] = counts.get(target["labels"]["job"], 0) + 1
    return counts


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The deployment, up and healthy: service name -> host address of its first replica."""
    started = time.monotonic()
    compose("down", "--volumes", "--remove-orphans")  # whatever an interrupted run left behind
    compose("up", "-d", "classify", "restore", "generate", "console", "prometheus")
    try:
        for service in PORTS:
            wait_until(f"{service} to be healthy", lambda s=service: container_health(s) == ["healthy"], 180)
        print(f"\ncompose up to all healthy: {time.monotonic() - started:.1f}s")
        yield {service: host_port(service) for service in PORTS}
    finally:
        try:
            if request.session.testsfailed:
                print(compose("ps"))
                print(compose("logs", "--no-color", "--tail", "30")[-8000:])
        finally:
            compose("down", "--volumes", "--remove-orphans")


@pytest.fixture(scope="module")
def test_images() -> tuple[np.ndarray, np.ndarray]:
    test = load_split("test")
    return test.images[:64], test.labels[:64]


def images_of(tensor: tensor_pb2.Tensor) -> np.ndarray:
    assert tensor.dtype == tensor_pb2.DATA_TYPE_FLOAT32
    return np.frombuffer(tensor.data, dtype="<f4").reshape(tuple(tensor.shape))


def test_health_from_the_host(stack: dict[str, str]) -> None:
    for service, address in stack.items():
        assert check_health(address) == "SERVING", service


def test_classify_the_shipped_model_from_the_host(stack: dict[str, str], test_images) -> None:  # type: ignore[no-untyped-def]
    images, labels = test_images
    with ClassifyClient(stack["classify"]) as client:
        reply = client.classify(tensor=images, top_k=1, timeout=30)
        as_png = client.classify(images=[encode_png(im / 255.0) for im in images[:8]], top_k=1, timeout=30)
    predicted = np.array([c.predictions[0].class_id for c in reply.classifications])
    assert reply.model_name == "classifier" and len(predicted) == len(labels)
    assert (predicted == labels).mean() >= 0.85, (predicted == labels).mean()  # the model card: 93.7% on all 10k
    assert [c.predictions[0].class_id for c in as_png.classifications] == predicted[:8].tolist()


def test_restore_denoises_from_the_host(stack: dict[str, str], test_images) -> None:  # type: ignore[no-untyped-def]
    clean = test_images[0][:16].astype(np.float32)[:, None] / 255.0
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 0.3, clean.shape), 0, 1).astype(np.float32)
    with RestoreClient(stack["restore"]) as client:
        reply = client.restore(tensor=noisy, as_tensor=True, timeout=30)
    restored = images_of(reply.tensor)

    def psnr(x: np.ndarray) -> float:
        return float(10 * np.log10(1.0 / ((x - clean) ** 2).mean()))

    assert restored.shape == clean.shape
    assert psnr(restored) >= psnr(noisy) + 6, (psnr(noisy), psnr(restored))
    assert len(reply.restorations) == 16 and all(r.anomaly_score > 0 for r in reply.restorations)


def test_generate_gan_and_diffusion_from_the_host(stack: dict[str, str]) -> None:
    with GenerateClient(stack["generate"]) as client:
        gan = client.generate(model="gan", count=8, labels=[7], seed=5, output="tensor", timeout=60)
        again = client.generate(model="gan", count=8, labels=[7], seed=5, output="tensor", timeout=60)
        diffusion = client.generate(
            model="diffusion", count=2, labels=[7], seed=5, steps=10, output="tensor", timeout=120
        )
    assert gan.tensor.data == again.tensor.data  # same seed, same images
    with ClassifyClient(stack["classify"]) as client:
        for reply in (gan, diffusion):
            images = images_of(reply.tensor)
            assert list(reply.labels) == [7] * len(images)
            classes = [c.predictions[0].class_id for c in client.classify(tensor=images, top_k=1).classifications]
            assert classes.count(7) >= len(images) // 2, (reply.model_name, classes)  # 7 = sneaker


def test_open_inference_protocol_from_the_host(stack: dict[str, str], test_images) -> None:  # type: ignore[no-untyped-def]
    images = test_images[0][:4].astype(np.float32)[:, None] / 255.0
    with grpc.insecure_channel(stack["classify"]) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(oip.ServerLiveRequest()).live
        assert stub.ModelReady(oip.ModelReadyRequest(name="classifier")).ready
        request = oip.ModelInferRequest(model_name="classifier")
        request.inputs.add(name="image", datatype="FP32", shape=images.shape)
        request.raw_input_contents.append(images.astype("<f4").tobytes())
        reply = stub.ModelInfer(request, timeout=30)
    assert [tuple(o.shape) for o in reply.outputs][0] == (4, 10)
    with ClassifyClient(stack["classify"]) as client:
        typed = [c.predictions[0].class_id for c in client.classify(tensor=images, top_k=1).classifications]
    logits = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(4, 10)
    assert logits.argmax(1).tolist() == typed


def test_prometheus_scrapes_every_service_with_nonzero_counters(stack: dict[str, str]) -> None:
    wait_until("Prometheus to see all three jobs up", lambda: all(up_targets().get(job) for job in JOBS), 90)
    wait_until("Prometheus to see the console's metrics up", lambda: up_targets().get("nnserve-console"), 90)
    blank = np.zeros((1, 28, 28), np.uint8)
    with ClassifyClient(stack["classify"]) as c, RestoreClient(stack["restore"]) as r:
        c.classify(tensor=blank, timeout=30)
        r.restore(tensor=blank, timeout=30)
    with GenerateClient(stack["generate"]) as g:
        g.generate(model="gan", count=1, timeout=30)
    services = "|".join(m.split("/")[0] for m in TYPED_METHOD.values())
    methods = "|".join(m.split("/")[1] for m in TYPED_METHOD.values())
    selector = f'grpc_code="OK", grpc_service=~"{services}", grpc_method=~"{methods}"'
    expr = f"sum by (job) (nnserve_grpc_requests_total{{{selector}}})"

    def counted() -> dict[str, float] | None:
        counts = query(expr)
        return counts if all(counts.get(job, 0) > 0 for job in JOBS) else None

    counts = wait_until("non-zero request counters for every job", counted, 60)
    print(f"\nPrometheus: OK typed-API calls by job: {counts}")
    rows = query("sum by (job) (nnserve_model_inference_rows_total)")
    assert all(rows.get(job, 0) > 0 for job in JOBS), rows


def test_scaled_classify_replicas_share_round_robin_calls(stack: dict[str, str]) -> None:
    """`--scale classify=2`: Prometheus finds both replicas through DNS, and a client inside the
    network using dns:///classify:50051 with round_robin spreads its calls over them."""
    compose("up", "-d", "--no-recreate", "--scale", "classify=2", "classify")
    wait_until("two healthy classify replicas", lambda: container_health("classify") == ["healthy", "healthy"], 180)
    wait_until("Prometheus to scrape both replicas", lambda: up_targets().get("nnserve-classify") == 2, 90)
    service, method = TYPED_METHOD["classify"].split("/")
    selector = f'job="nnserve-classify", grpc_code="OK", grpc_service="{service}", grpc_method="{method}"'
    expr = f"sum by (instance) (nnserve_grpc_requests_total{{{selector}}})"
    before = query(expr)
    calls = 400
    out = compose(
        "exec", "-T", "classify",
        "nnserve", "loadtest", "dns:///classify:50051", "--round-robin", "--requests", str(calls),
        "--warmup", "0", "--concurrency", "4", "--channels", "1", "--quiet",
        timeout=120,
    )  # fmt: skip
    print(out)

    def spread() -> dict[str, float] | None:
        after = query(expr)
        delta = {i: after[i] - before.get(i, 0.0) for i in after}
        return delta if len(delta) == 2 and sum(delta.values()) >= calls else None

    delta = wait_until("Prometheus to count the load test's calls", spread, 60)
    print(f"\nround-robin calls per replica: {delta}")
    assert min(delta.values()) >= 0.3 * calls, delta
