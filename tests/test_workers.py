"""Several serving processes on one port: load spreads over them, metrics merge, drain and restart work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from services.core.workers import merge_expositions
from services.loadtest import add_arguments
from services.loadtest import run as run_load
from tests.helpers import ServiceProcess, metric_value, start_service

# The labels of the typed Classify call's series.
METHOD = {"grpc_service": "nnserve.v1.ClassifyService", "grpc_method": "Classify"}


def port_info(server: ServiceProcess) -> dict:
    port_file = next(server.log_path.parent.glob(server.log_path.stem + ".json"))
    return json.loads(port_file.read_text())


def load(address: str, requests: int) -> dict:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([address, "--quiet", "--requests", str(requests), "--duration", "120", "--warmup", "0"])
    args.concurrency, args.channels = 16, 8
    return run_load(args)


def worker_count(text: str) -> float:
    return metric_value(text, "nnserve_grpc_requests_total", **METHOD, grpc_code="OK")


@pytest.fixture
def two_workers(tiny_repository: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    server = start_service("services.classify", tiny_repository, tmp_path, "--workers", "2")
    yield server
    server.stop()


def test_connections_spread_over_workers_and_metrics_merge(two_workers: ServiceProcess) -> None:
    info = port_info(two_workers)
    assert info["workers"] == 2 and len(info["pids"]) == 2
    report = load(two_workers.address, 2000)
    assert report["ok"] == 2000 and report["errors"] == {}
    per_worker = []
    for port in info["worker_metrics_ports"]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            per_worker.append(worker_count(reply.read().decode()))
    assert all(n > 0 for n in per_worker), f"a worker served nothing: {per_worker}"
    merged = two_workers.metrics_text()
    assert worker_count(merged) == sum(per_worker) == 2000
    # One model_info series, not one per worker, and a text Prometheus accepts.
    assert metric_value(merged, "nnserve_model_info", model="classifier") == 1
    check = subprocess.run(["promtool", "check", "metrics"], input=merged.encode(), capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://127.0.0.1:{two_workers.metrics_port}/v2/health/ready", timeout=5)
    assert caught.value.code == 404


def test_a_dead_worker_is_replaced_and_sigterm_drains_all(two_workers: ServiceProcess) -> None:
    info = port_info(two_workers)
    victim = info["pids"][0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = Path(f"/proc/{two_workers.proc.pid}/task/{two_workers.proc.pid}/children").read_text().split()
        if len(children) == 2 and str(victim) not in children:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the killed worker was not replaced: {children}")
    # The replacement needs a moment to load; a few thousand calls then all succeed.
    time.sleep(2)
    report = load(two_workers.address, 1000)
    assert report["errors"] == {} and report["ok"] == 1000
    assert two_workers.stop() == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_merge_sums_counters_and_histograms_and_keeps_info_at_one() -> None:
    one = """# HELP x_total Calls.
# TYPE x_total counter
x_total{code="OK"} 3.0
x_created{code="OK"} 1.7e9
# HELP h_seconds Time.
# TYPE h_seconds histogram
h_seconds_bucket{le="0.1"} 1.0
h_seconds_bucket{le="+Inf"} 2.0
h_seconds_count 2.0
h_seconds_sum 0.3
# HELP m_info Model.
# TYPE m_info gauge
m_info{version="1"} 1.0
"""
    two = one.replace('x_total{code="OK"} 3.0', 'x_total{code="OK"} 4.0')
    merged = merge_expositions([one, two])
    assert 'x_total{code="OK"} 7.0' in merged
    assert 'h_seconds_bucket{le="+Inf"} 4.0' in merged and "h_seconds_sum 0.6" in merged
    assert 'm_info{version="1"} 1.0' in merged
    assert "_created" not in merged


def test_workers_share_one_http_port(two_workers: ServiceProcess) -> None:
    """With --http-port 0 each worker bound a random port of its own and the port file named worker
    0's, so the other never served HTTP. Now both bind one port and new connections spread."""
    info = port_info(two_workers)
    for _ in range(40):  # each urlopen is a new connection: SO_REUSEPORT spreads them
        with urllib.request.urlopen(f"http://127.0.0.1:{info['http_port']}/v2/health/ready", timeout=10) as reply:
            assert reply.status == 200
    served = []
    for port in info["worker_metrics_ports"]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            served.append(metric_value(reply.read().decode(), "nnserve_http_requests_total"))
    assert sum(served) == 40 and all(n > 0 for n in served), served
