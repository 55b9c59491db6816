"""Property-based fuzzing of the HTTP routes: whatever arrives, the answer is a 2xx or a 4xx with a JSON
error, never a 500, and the service keeps serving (tests/test_fuzz.py does the same for gRPC)."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import ServiceProcess
from tests.test_http import BINARY, Reply, call

EXAMPLES = int(os.environ.get("NNSERVE_HTTP_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
ALLOWED = {200, 400, 404, 405, 413, 415, 429}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
datatypes = st.sampled_from(["FP32", "FP16", "INT64", "UINT8", "BOOL", "BYTES", "fp32", ""])
shapes = st.one_of(
    st.lists(st.integers(-2, 3000), max_size=5),
    st.sampled_from([[1, 1, 28, 28], [2, 1, 28, 28], [1, 28, 28], [0, 1, 28, 28]]),
    json_values,
)


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": draw(st.sampled_from(["image", "images", "", "x_t"]) | json_values),
        "datatype": draw(datatypes | json_values),
        "shape": draw(shapes),
    }
    choice = draw(st.integers(0, 3))
    if choice == 0:
        entry["data"] = draw(json_values)
    elif choice == 1:
        entry["data"] = [draw(st.sampled_from([0.5, 1, True, "a", None, 1e300]))] * draw(
            st.sampled_from([1, 784, 1568])
        )
    elif choice == 2:
        entry["parameters"] = {"binary_data_size": draw(st.integers(-5, 7000) | json_values)}
    return entry


@st.composite
def infer_bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    document: Any
    if draw(st.booleans()):
        document = {"inputs": draw(st.lists(tensors(), max_size=3))}
        if draw(st.booleans()):
            document["outputs"] = draw(st.lists(st.fixed_dictionaries({"name": st.text(max_size=8)}), max_size=2))
        if draw(st.booleans()):
            document["parameters"] = draw(json_values)
        if draw(st.booleans()):
            document["id"] = draw(json_values)
    else:
        document = draw(json_values)
    header = json.dumps(document).encode()
    headers = {"Content-Type": draw(st.sampled_from(["application/json", "application/octet-stream", "text/plain"]))}
    # (Not br: without the Brotli package, aiohttp's parser answers that in plain text before any handler.)
    encoding = draw(st.sampled_from([None, None, "gzip", "deflate", "x-unknown"]))
    if encoding:  # claimed, not applied: the body cannot be decoded as it says
        headers["Content-Encoding"] = encoding
    binary = draw(st.binary(max_size=64)) + b"\0" * draw(st.sampled_from([0, 3136, 6272]))
    if draw(st.booleans()):
        headers[BINARY] = draw(st.sampled_from([str(len(header)), str(len(header) + 1), "-3", "x", "99999999"]))
        return header + binary, headers
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200)), headers
    return header, headers


@st.composite
def typed_requests(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, str]]:
    path = draw(st.sampled_from(["/v1/classify", "/v1/restore", "/v1/generate", "/v1/generate/stream"]))
    fields = {
        "top_k": st.integers(-2, 12),
        "model_version": st.integers(-1, 3) | st.text(max_size=4),
        "count": st.integers(-1, 20),
        "labels": st.lists(st.integers(-2, 12), max_size=4),
        "model": st.sampled_from(["GENERATOR_MODEL_GAN", "GENERATOR_MODEL_DIFFUSION", "X", "7"]),
        "output": st.integers(-1, 4),
        "diffusion": st.fixed_dictionaries(
            {},
            optional={
                "steps": st.integers(-1, 12) | st.just(100000),
                "eta": st.floats(-1, 2) | st.just("NaN"),
                "sampler": st.integers(-1, 4),
                "preview_every": st.integers(0, 3),
            },
        ),
        "images": st.lists(st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()), max_size=2),
        "tensor": st.fixed_dictionaries({"dtype": st.integers(-1, 3), "shape": shapes, "data": st.just("AAAA")}),
    }
    document = draw(st.fixed_dictionaries({}, optional=fields)) if draw(st.integers(0, 3)) else draw(json_values)
    kind = draw(st.sampled_from(["application/json", "image/png", "multipart/form-data; boundary=b", "text/csv", ""]))
    body = json.dumps(document).encode() if kind in ("application/json", "") else draw(st.binary(max_size=300))
    query = draw(st.sampled_from(["", "?top_k=3", "?count=2&seed=1", "?diffusion.steps=x", "?a.b=1&a=2", "?zz=1"]))
    method = draw(st.sampled_from(["POST", "POST", "GET"]))
    return method, path + query, body, ({"Content-Type": kind} if kind else {})


def check(reply: Reply) -> None:
    assert reply.status in ALLOWED, (reply.status, reply.body[:300])
    if reply.status != 200:
        assert reply.json()["error"], reply.body


@pytest.mark.parametrize("server_name", ["classify_server", "generate_server"])
def test_fuzz_oip_infer(server_name: str, request: pytest.FixtureRequest) -> None:
    server: ServiceProcess = request.getfixturevalue(server_name)
    port = server.http_port
    assert port
    model = "classifier" if server_name == "classify_server" else "diffusion_denoiser"

    @FUZZ
    @given(infer_bodies(), st.sampled_from([model, f"{model}/versions/1", f"{model}/versions/x", "nope"]))
    def run(body: tuple[bytes, dict[str, str]], target: str) -> None:
        check(call(port, "POST", f"/v2/models/{target}/infer", body[0], body[1]))

    run()
    assert call(port, "GET", "/v2/health/ready").status == 200
    assert " ERROR " not in server.log(), server.log()[-3000:]


def test_fuzz_typed_routes_paths_and_methods(classify_server: ServiceProcess, generate_server: ServiceProcess) -> None:
    ports = {"classify": classify_server.http_port, "generate": generate_server.http_port}

    @FUZZ
    @given(typed_requests(), st.sampled_from(sorted(ports)))
    def typed(spec: tuple[str, str, bytes, dict[str, str]], where: str) -> None:
        method, path, body, headers = spec
        reply = call(ports[where] or 0, method, path, body, headers)
        if reply.status == 200 and reply.headers.get("Content-Type", "").startswith("text/event-stream"):
            assert reply.body.rstrip().split(b"\n\n")[-1].startswith((b"event: result", b"event: error"))
            return
        check(reply)

    @FUZZ
    @given(
        st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD"]),
        st.lists(st.sampled_from(["v2", "v1", "models", "classifier", "infer", "stats", "..", "%2F", "x"]), max_size=5),
    )
    def paths(method: str, parts: list[str]) -> None:
        reply = call(ports["classify"] or 0, method, "/" + "/".join(parts))
        assert reply.status in ALLOWED | {503}, reply.status  # 503: a model ready route answering "not ready"
        if reply.status != 200 and method != "HEAD":
            assert reply.json()

    typed()
    paths()
    for server in (classify_server, generate_server):
        assert call(server.http_port or 0, "GET", "/v2/health/ready").status == 200
        assert " ERROR " not in server.log(), server.log()[-3000:]
