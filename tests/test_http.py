"""The HTTP server of every service: OIP REST, typed routes, errors, auth, TLS, drain, metrics port.

Every test talks real HTTP/1.1 (http.client) to service processes started as users start them.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import io
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from services.core import errors
from services.core.http_context import http_status
from services.core.interceptor import status_for
from services.core.transcode import RULES
from services.proto.inference import grpc_service_pb2 as oip_pb
from services.proto.inference import grpc_service_pb2_grpc as oip_grpc
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc
from tests.helpers import ROOT, ServiceProcess, metric_value, start_service

TOKEN = "http-test-token"
BINARY = "Inference-Header-Content-Length"


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        document = self.json()
        assert "error" in document and set(document) <= {"error", "details"}, document
        return str(document["error"])


def call(
    port: int,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> Reply:
    """One request on a fresh connection."""
    if tls is None:
        connection: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=tls)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def post_json(port: int, path: str, document: Any, headers: dict[str, str] | None = None) -> Reply:
    return call(port, "POST", path, json.dumps(document), {"Content-Type": "application/json", **(headers or {})})


def png(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (28, 28), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def multipart(parts: list[tuple[str, bytes, str | None]]) -> tuple[bytes, str]:
    """A multipart/form-data body from (name, content, filename or None) parts, and its Content-Type."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, content, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "Content-Type: image/png\r\n" if filename else ""
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + content + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def image_input(x: np.ndarray, data: bool = True) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "image", "datatype": "FP32", "shape": list(x.shape)}
    if data:
        entry["data"] = x.tolist()
    else:
        entry["parameters"] = {"binary_data_size": x.nbytes}
    return entry


def binary_body(document: dict[str, Any], *tensors: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(document).encode()
    return header + b"".join(tensors), {BINARY: str(len(header)), "Content-Type": "application/octet-stream"}


def parse_binary(reply: Reply) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    length = int(reply.headers[BINARY])
    document = json.loads(reply.body[:length])
    arrays, offset = {}, length
    for output in document["outputs"]:
        size = output["parameters"]["binary_data_size"]
        arrays[output["name"]] = np.frombuffer(reply.body[offset : offset + size], np.float32).reshape(output["shape"])
        offset += size
    assert offset == len(reply.body)
    return document, arrays


@pytest.fixture(scope="module")
def reference(tiny_repository: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(tiny_repository / "classifier" / "2" / "model.onnx"))


# --- the OIP REST API -----------------------------------------------------------------------------


def test_health_and_metadata_routes(classify_server: ServiceProcess) -> None:
    port = classify_server.http_port
    assert port
    assert call(port, "GET", "/v2/health/live").json() == {"live": True}
    assert call(port, "GET", "/v2/health/ready").json() == {"ready": True}
    server = call(port, "GET", "/v2").json()
    assert server["name"] == "nnserve" and "statistics" in server["extensions"]
    for path in ("/v2/models/classifier", "/v2/models/classifier/versions/2"):
        metadata = call(port, "GET", path).json()
        assert metadata["versions"] == ["2"] and metadata["platform"] == "onnxruntime_onnx"
        assert metadata["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert call(port, "GET", "/v2/models/classifier/ready").json() == {"name": "classifier", "ready": True}
    config = call(port, "GET", "/v2/models/classifier/versions/2/config").json()
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [1, 28, 28]
    stats = call(port, "GET", "/v2/models/stats").json()["model_stats"]
    assert [s["name"] for s in stats] == ["classifier"] and "cache_hit" in stats[0]["inference_stats"]
    assert call(port, "HEAD", "/v2/health/ready").status == 200
    assert call(port, "GET", "/v2/nope").headers["Server"] == "nnserve"  # no versions for scanners


def test_unknown_model_and_version_get_the_grpc_message(classify_server: ServiceProcess) -> None:
    port = classify_server.http_port
    assert port
    with grpc.insecure_channel(classify_server.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for name, version, path in [
            ("nope", "", "/v2/models/nope"),
            ("classifier", "1", "/v2/models/classifier/versions/1"),
        ]:
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelMetadata(oip_pb.ModelMetadataRequest(name=name, version=version))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            for suffix in ("", "/config", "/stats", "/ready"):
                reply = call(port, "GET", path + suffix)
                assert reply.status == 404 and reply.error == caught.value.details(), (path + suffix, reply.body)
            reply = post_json(port, path + "/infer", {"inputs": []})
            assert reply.status == 404 and reply.error == caught.value.details()


@pytest.mark.parametrize("batch", [1, 8, 64])  # 64: a 1.3 MB JSON body, parsed in the decode pool
def test_infer_json_and_binary_match_onnxruntime(
    classify_server: ServiceProcess, reference: ort.InferenceSession, batch: int
) -> None:
    port = classify_server.http_port
    assert port
    x = np.random.default_rng(batch).random((batch, 1, 28, 28), dtype=np.float32)
    expected = reference.run(None, {"image": x})[0]
    reply = post_json(port, "/v2/models/classifier/infer", {"id": "r1", "inputs": [image_input(x)]})
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("application/json")
    document = reply.json()
    assert document["id"] == "r1" and document["model_version"] == "2"
    (output,) = document["outputs"]
    assert output["name"] == "logits" and output["shape"] == [batch, 10]
    np.testing.assert_allclose(np.array(output["data"], np.float32).reshape(batch, 10), expected, rtol=1e-5, atol=1e-6)
    body, headers = binary_body(
        {"inputs": [image_input(x, data=False)], "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]},
        x.tobytes(),
    )
    reply = call(port, "POST", "/v2/models/classifier/versions/2/infer", body, headers)
    assert reply.status == 200, reply.body
    _, arrays = parse_binary(reply)
    np.testing.assert_allclose(arrays["logits"], expected, rtol=1e-5, atol=1e-6)


def test_inference_errors_get_4xx_and_harm_nothing(classify_server: ServiceProcess) -> None:
    port = classify_server.http_port
    assert port
    infer = "/v2/models/classifier/infer"
    x = np.zeros((1, 1, 28, 28), np.float32)
    good_doc = {"inputs": [image_input(x, data=False)]}
    header = json.dumps(good_doc).encode()
    cases: list[tuple[str, bytes | str, dict[str, str], int, str]] = [
        ("malformed JSON", '{"inputs": [', {"Content-Type": "application/json"}, 400, "not valid JSON"),
        ("not an object", "[1, 2]", {"Content-Type": "application/json"}, 400, "request body: must be a JSON object"),
        (
            "inputs not a list",
            '{"inputs": 3}',
            {"Content-Type": "application/json"},
            400,
            "inputs: must be a JSON array",
        ),
        (
            "wrong datatype",
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "INT64", "shape": [1, 1, 28, 28], "data": [0] * 784}]}
            ),
            {"Content-Type": "application/json"},
            400,
            "input 'image': datatype must be FP32, got 'INT64'",
        ),
        (
            "too few values",
            json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.5]}]}),
            {"Content-Type": "application/json"},
            400,
            "has 1 values, shape [1, 1, 28, 28] needs 784",
        ),
        (
            "strings as data",
            json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": ["a"]}]}),
            {"Content-Type": "application/json"},
            400,
            "data must be numbers",
        ),
        (
            "unknown output",
            json.dumps({"inputs": [image_input(x)], "outputs": [{"name": "probs"}]}),
            {"Content-Type": "application/json"},
            400,
            "outputs[0]: model classifier has no output 'probs'",
        ),
        ("wrong content type", "a=b", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
        ("image as inference body", png(), {"Content-Type": "image/png"}, 415, "application/json"),
        (
            "truncated binary payload",
            header + x.tobytes()[:-100],
            {BINARY: str(len(header))},
            400,
            "binary_data_size: 3136 bytes at offset 0, but the binary part of the body has 3036 bytes",
        ),
        (
            "binary payload too long",
            header + x.tobytes() + b"\0" * 8,
            {BINARY: str(len(header))},
            400,
            "the binary part of the body has 3144 bytes",
        ),
        ("header length past the body", header, {BINARY: str(len(header) + 10)}, 400, BINARY),
        ("header length not a number", header, {BINARY: "-1"}, 400, BINARY),
        (
            "a body that is not the gzip it claims",
            b"\x1f\x8b not gzip",
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
            400,
            "request body: is not valid gzip data",
        ),
        (
            "a gzip body cut short",
            gzip.compress(json.dumps({"inputs": [image_input(x)]}).encode())[:-30],
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
            400,
            "request body: its gzip data ends early",
        ),
        ("an unknown Content-Encoding", header, {"Content-Encoding": "br"}, 415, "Content-Encoding: 'br'"),
    ]
    for name, body, headers, status, needle in cases:
        reply = call(port, "POST", infer, body, headers)
        assert reply.status == status, (name, reply.status, reply.body)
        assert needle in reply.error, (name, reply.error)
    for method, path, status in [
        ("GET", "/v2/nope", 404),
        ("GET", "/", 404),
        ("GET", "/metrics", 404),
        ("DELETE", "/v2/models/classifier", 405),
        ("GET", infer, 405),
        ("PATCH", "/v2", 405),
    ]:
        reply = call(port, method, path)
        assert reply.status == status and reply.error, (method, path, reply.body)
    compressed = gzip.compress(json.dumps({"inputs": [image_input(x)]}).encode())
    reply = call(port, "POST", infer, compressed, {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert reply.status == 200, reply.body  # as tritonclient sends with request_compression_algorithm="gzip"
    # A method llhttp does not know is refused by the HTTP parser itself, before any handler.
    assert call(port, "BREW", "/v2").status == 400
    # Nothing harmed.
    assert call(port, "GET", "/v2/health/ready").status == 200
    assert post_json(port, infer, {"inputs": [image_input(x)]}).status == 200


def test_requests_the_parser_refuses_get_400_and_no_error_log(classify_server: ServiceProcess) -> None:
    port = classify_server.http_port
    assert port
    infer = b"POST /v2/models/classifier/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    for raw in [
        infer + b"Transfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n",  # a bad chunk size
        infer + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # both framings
        b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n",  # a header over 8 KiB
        b"GET /v2 HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    ]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(raw)
            assert connection.recv(100).startswith(b"HTTP/1.0 400 "), raw[:80]
    assert " ERROR " not in classify_server.log(), classify_server.log()[-2000:]
    assert call(port, "GET", "/v2/health/ready").status == 200


def test_status_table_covers_every_domain_error() -> None:
    expected = {
        errors.InvalidInput("f", "bad"): 400,
        errors.OutOfRange("f", 3, "0..1"): 400,
        errors.ModelNotFound("m"): 404,
        errors.Overloaded("queue full"): 429,
        errors.Unavailable("draining"): 503,
        errors.Unauthenticated("token"): 401,
        errors.DeadlineExpired("late"): 504,
        errors.InferenceFailed("boom"): 500,
        errors.ModelLoadError("file"): 500,
        RuntimeError("surprise"): 500,
    }
    for exc, status in expected.items():
        code, _ = status_for(exc)
        assert http_status(code) == status, exc


def test_metrics_port_answers_metrics_only_and_counts_http_by_route(classify_server: ServiceProcess) -> None:
    port, metrics_port = classify_server.http_port, classify_server.metrics_port
    assert port and metrics_port
    call(port, "GET", f"/v2/no/such/path/{uuid.uuid4().hex}")
    call(port, "GET", "/v2/health/ready")
    for path in ("/v2/health/ready", "/", "/metricsx", "/v2/models/classifier/infer"):
        assert call(metrics_port, "GET", path).status == 404, path
    text = call(metrics_port, "GET", "/metrics?name[]=x").body.decode()
    assert metric_value(text, "nnserve_http_requests_total", route="GET /v2/health/ready", code="200") >= 1
    assert metric_value(text, "nnserve_http_requests_total", route="unknown", code="404") >= 1
    routes = {line.split('route="')[1].split('"')[0] for line in text.splitlines() if 'route="' in line}
    assert not any("no/such" in r or "classifier" in r for r in routes), routes
    promtool = shutil.which("promtool")
    if promtool is not None:  # CI installs it; tests/test_classify_service.py checks the gRPC series
        result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_full_queue_gets_429_with_the_grpc_message(tiny_repository: Path, tmp_path: Path) -> None:
    server = start_service(
        "services.classify",
        tiny_repository,
        tmp_path,
        "--max-queue-size",
        "4",
        "--max-delay-ms",
        "3000",
        "--max-batch-size",
        "256",
        "--inline-max-rows",
        "0",
    )
    try:
        port = server.http_port
        assert port
        body = {"inputs": [image_input(np.zeros((1, 1, 28, 28), np.float32))]}
        with ThreadPoolExecutor(4) as pool:
            admitted = [pool.submit(post_json, port, "/v2/models/classifier/infer", body) for _ in range(4)]
            # The four wait for their batch to fill (3 s): wait until the queue holds them, then one more.
            deadline = time.monotonic() + 2.5
            while metric_value(server.metrics_text(), "nnserve_batch_queue_depth_requests") < 4:
                assert time.monotonic() < deadline, "the four requests never queued"
                time.sleep(0.02)
            refused = post_json(port, "/v2/models/classifier/infer", body)
            assert refused.status == 429 and "max_queue_size=4" in refused.error, refused.body
            assert [f.result().status for f in admitted] == [200] * 4
    finally:
        assert server.stop() == 0


def test_every_typed_rpc_has_an_http_route() -> None:
    from services.proto.nnserve.model.v1 import model_info_pb2
    from services.proto.nnserve.v1 import generate_pb2, restore_pb2

    rpcs = [
        method.full_name
        for module in (classify_pb2, restore_pb2, generate_pb2, model_info_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]
    assert sorted({rule.rpc for rule in RULES}) == sorted(rpcs)
    assert len({rule.path for rule in RULES}) == len(RULES)
    # One route per RPC, but DescribeModel's version may be given in the path too.
    assert len(RULES) == len(rpcs) + 1


# --- typed routes ---------------------------------------------------------------------------------


def test_classify_route_takes_multipart_raw_and_json_like_grpc(classify_server: ServiceProcess) -> None:
    port = classify_server.http_port
    assert port
    images = [png(1), png(2)]
    with grpc.insecure_channel(classify_server.address) as channel:
        stub = classify_pb2_grpc.ClassifyServiceStub(channel)
        expected = stub.Classify(classify_pb2.ClassifyRequest(images=images, top_k=3))
    want = [[p.label for p in c.predictions] for c in expected.classifications]
    body, content_type = multipart(
        [("image", images[0], "a.png"), ("images", images[1], "b.png"), ("top_k", b"3", None)]
    )
    replies = [
        call(port, "POST", "/v1/classify", body, {"Content-Type": content_type}),
        post_json(port, "/v1/classify", {"images": [base64.b64encode(i).decode() for i in images], "top_k": 3}),
    ]
    for reply in replies:
        assert reply.status == 200, reply.body
        got = [[p["label"] for p in c["predictions"]] for c in reply.json()["classifications"]]
        assert got == want
    raw = call(port, "POST", "/v1/classify?top_k=2", images[0], {"Content-Type": "image/png"})
    assert [p["label"] for p in raw.json()["classifications"][0]["predictions"]] == want[0][:2]
    bad = call(port, "POST", "/v1/classify?top_k=11", images[0], {"Content-Type": "image/png"})
    assert bad.status == 400 and bad.error.startswith("top_k:")
    unknown = post_json(port, "/v1/classify", {"topk": 3})
    assert unknown.status == 400 and "topk" in unknown.error
    garbage = call(port, "POST", "/v1/classify", b"not an image", {"Content-Type": "image/png"})
    assert garbage.status == 400 and "images[0]" in garbage.error
    wrong = call(port, "POST", "/v1/classify", "x", {"Content-Type": "text/plain"})
    assert wrong.status == 415


def test_restore_route_answers_png_or_json(restore_server: ServiceProcess) -> None:
    port = restore_server.http_port
    assert port
    image = png(3)
    reply = call(port, "POST", "/v1/restore", image, {"Content-Type": "image/png", "Accept": "image/png"})
    assert reply.status == 200 and reply.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(reply.body)).size == (28, 28)
    assert float(reply.headers["X-Anomaly-Score"]) >= 0 and reply.headers["X-Anomalous"] in ("true", "false")
    body, content_type = multipart([("image", image, "a.png"), ("mask", png(4), "m.png")])
    reply = call(port, "POST", "/v1/restore", body, {"Content-Type": content_type})
    (restoration,) = reply.json()["restorations"]
    assert "png" in restoration and "anomaly_score" in restoration
    two, content_type = multipart([("images", image, "a.png"), ("images", image, "b.png")])
    reply = call(port, "POST", "/v1/restore", two, {"Content-Type": content_type, "Accept": "image/png"})
    assert reply.status == 400 and "this request has 2" in reply.error


def test_generate_routes_grid_json_and_server_sent_events(generate_server: ServiceProcess) -> None:
    port = generate_server.http_port
    assert port
    reply = post_json(port, "/v1/generate", {"count": 4, "seed": 7, "labels": [1, 2, 3, 4]}, {"Accept": "image/png"})
    assert reply.status == 200 and reply.headers["Content-Type"] == "image/png"
    assert reply.headers["X-Seed"] == "7" and reply.headers["X-Labels"] == "1,2,3,4"
    Image.open(io.BytesIO(reply.body)).verify()
    document = post_json(port, "/v1/generate", {"count": 2, "seed": 7}).json()
    assert len(document["pngs"]) == 2 and document["seed"] == "7"
    too_many = post_json(port, "/v1/generate", {"count": 1000})
    assert too_many.status == 400 and too_many.error.startswith("count")
    query = "model=GENERATOR_MODEL_DIFFUSION&count=2&seed=3&diffusion.steps=5&diffusion.preview_every=2"
    for method in ("GET", "POST"):
        stream = call(port, method, f"/v1/generate/stream?{query}")
        assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        events = [block.split("\n", 1) for block in stream.body.decode().strip().split("\n\n")]
        kinds = [kind.removeprefix("event: ") for kind, _ in events]
        assert kinds == ["progress"] * 5 + ["result"], kinds
        data = [json.loads(line.removeprefix("data: ")) for _, line in events]
        assert [d["step"] for d in data[:5]] == [1, 2, 3, 4, 5] and "preview_png" in data[1]
        assert len(data[-1]["pngs"]) == 2
    refused = call(port, "GET", "/v1/generate/stream?model=GENERATOR_MODEL_DIFFUSION&count=1&diffusion.steps=100000")
    assert refused.status == 400 and refused.error.startswith("diffusion.steps")


def test_deadline_headers(generate_server: ServiceProcess) -> None:
    port = generate_server.http_port
    assert port
    for header, value in (("X-Request-Timeout", "abc"), ("X-Request-Timeout", "-1"), ("grpc-timeout", "10")):
        reply = call(port, "GET", "/v2", headers={header: value})
        assert reply.status == 400 and reply.error.startswith(f"{header} header:"), reply.body
    assert call(port, "GET", "/v2", headers={"grpc-timeout": "5S"}).status == 200
    heavy = {"model": "GENERATOR_MODEL_DIFFUSION", "count": 8, "diffusion": {"steps": 1000}}
    for header, value in (("grpc-timeout", "1m"), ("X-Request-Timeout", "0.001")):
        reply = post_json(port, "/v1/generate", heavy, {header: value})
        assert reply.status == 504 and reply.error, reply.body


def test_closing_an_event_stream_cancels_its_sampling(generate_server: ServiceProcess) -> None:
    port = generate_server.http_port
    assert port

    def cancelled() -> float:
        text = generate_server.metrics_text()
        return metric_value(text, "nnserve_batch_rejected_total", model="diffusion_denoiser", reason="cancelled")

    before = cancelled()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    query = "model=GENERATOR_MODEL_DIFFUSION&count=8&seed=3&diffusion.sampler=SAMPLER_DDPM&diffusion.steps=1000"
    connection.request("GET", f"/v1/generate/stream?{query}")
    response = connection.getresponse()
    assert response.status == 200 and response.readline() == b"event: progress\n"
    connection.close()
    deadline = time.monotonic() + 20
    while cancelled() == before:
        assert time.monotonic() < deadline, "the job of a closed stream was not cancelled"
        time.sleep(0.05)
    assert post_json(port, "/v1/generate", {"count": 1}).status == 200


def readme_http_commands() -> list[str]:
    """The commands of the README's "HTTP" section: lines indented under a command continue it."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## HTTP\n")
    section = text[start : text.index("\n## ", start + 1)]
    commands: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and commands:
                commands[-1] += "\n" + line
            elif line.strip() and not line.startswith("#"):
                commands.append(line)
    return commands


def test_readme_http_examples_run_as_written(
    classify_server: ServiceProcess, restore_server: ServiceProcess, generate_server: ServiceProcess, tmp_path: Path
) -> None:
    """Every curl line of README "HTTP" succeeds (curl --fail) from a directory holding examples/; only the
    ports change."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    ports = {8001: classify_server.http_port, 8002: restore_server.http_port, 8003: generate_server.http_port}
    commands = readme_http_commands()
    assert len(commands) >= 14, commands
    for command in commands:
        run = re.sub(r"localhost:(800[123])", lambda m: f"127.0.0.1:{ports[int(m.group(1))]}", command)
        run = re.sub(r"\bcurl ", "curl --fail --silent --show-error ", run)
        result = subprocess.run(
            ["bash", "-c", f"set -o pipefail\n{run}"], cwd=tmp_path, capture_output=True, timeout=60
        )
        assert result.returncode == 0, (command, result.stdout[-500:], result.stderr[-500:])
    for name in ("restored.png", "grid.png"):
        Image.open(tmp_path / name).verify()


# --- auth, size limits, TLS, drain ----------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_server(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The classify service with a bearer token and a 64 KiB message limit."""
    server = start_service(
        "services.classify",
        tiny_repository,
        tmp_path_factory.mktemp("strict"),
        "--auth-token",
        TOKEN,
        "--max-message-bytes",
        "65536",
    )
    yield server
    server.stop()


def test_bearer_token_applies_to_http_as_to_grpc(strict_server: ServiceProcess) -> None:
    port = strict_server.http_port
    assert port
    x = np.zeros((1, 1, 28, 28), np.float32)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for method, path in (("GET", "/v2"), ("POST", "/v1/classify"), ("GET", "/v2/secret-path")):
            reply = call(port, method, path, headers=headers)
            assert reply.status == 401 and reply.error == "missing or invalid bearer token", (path, headers)
    assert call(port, "GET", "/v2/health/ready").status == 200  # health is exempt, as for gRPC
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert post_json(port, "/v2/models/classifier/infer", {"inputs": [image_input(x)]}, auth).status == 200
    assert call(port, "GET", "/v2/secret-path", headers=auth).status == 404


def test_oversized_bodies_get_413_naming_the_limit(strict_server: ServiceProcess) -> None:
    port = strict_server.http_port
    assert port
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    big = b"[" + b"0," * 40000 + b"0]"
    for path in ("/v2/models/classifier/infer", "/v1/classify"):
        reply = call(port, "POST", path, big, auth)
        assert reply.status == 413 and "over the limit of 65536 bytes" in reply.error, reply.body
    bomb = gzip.compress(b" " * 2_000_000)  # 2 KB that decode to 2 MB of JSON whitespace
    reply = call(port, "POST", "/v2/models/classifier/infer", bomb, {**auth, "Content-Encoding": "gzip"})
    assert reply.status == 413 and "over the limit of 65536 bytes" in reply.error, reply.body
    # Chunked, so the size is only known while reading.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/v1/classify", body=iter([big[:40000], big[40000:]]), headers=auth)
        response = connection.getresponse()
        assert response.status == 413 and "65536" in json.loads(response.read())["error"]
    finally:
        connection.close()
    assert call(port, "GET", "/v2/health/ready").status == 200


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@pytest.mark.parametrize("mutual", [False, True])
def test_tls_applies_to_http(tiny_repository: Path, tmp_path: Path, mutual: bool) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=nnserve-http-test-ca")  # fmt: skip
    (tmp_path / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")  # fmt: skip
        extra = ["-extfile", "server.ext"] if name == "server" else []
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", *extra)  # fmt: skip
    args = ["--tls-cert-file", str(tmp_path / "server.pem"), "--tls-key-file", str(tmp_path / "server.key")]
    if mutual:
        args += ["--tls-client-ca-file", str(tmp_path / "ca.pem")]
    server = start_service("services.classify", tiny_repository, tmp_path / "run", *args)
    try:
        port = server.http_port
        assert port
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        if mutual:
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                call(port, "GET", "/v2/health/ready", tls=context)  # no client certificate
            context.load_cert_chain(str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
        assert call(port, "GET", "/v2/health/ready", tls=context).json() == {"ready": True}
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            call(port, "GET", "/v2/health/ready")  # plaintext to a TLS port
    finally:
        assert server.stop() == 0


def test_sigterm_drains_http_ready_503_then_exits(tiny_repository: Path, tmp_path: Path) -> None:
    server = start_service("services.classify", tiny_repository, tmp_path, "--shutdown-delay-s", "8")
    port = server.http_port
    assert port
    assert call(port, "GET", "/v2/health/ready").status == 200
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 6  # well inside the 8 s during which draining answers 503
    ready = call(port, "GET", "/v2/health/ready")
    while ready.status == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
        ready = call(port, "GET", "/v2/health/ready")
    assert ready.status == 503 and ready.json() == {"ready": False}
    refused = post_json(port, "/v2/models/classifier/infer", {"inputs": []})
    assert refused.status == 503 and "shutting down" in refused.error
    assert refused.headers["Connection"] == "close"
    assert call(port, "GET", "/v2/health/live").status == 200
    assert server.proc.wait(timeout=30) == 0
