"""Fast checks of the deployment files: compose, Prometheus config, Grafana dashboard, Dockerfiles."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import CollectorRegistry

from services.core.metrics import Metrics
from tests.helpers import ROOT


def exported_metric_names() -> set[str]:
    """Every sample name the services can export (with _bucket/_sum/_count/_total suffixes)."""
    metrics = Metrics(CollectorRegistry(), "x")
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count", "_created"))
    return names


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "docker/grafana/dashboards/nnserve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(nnserve_[a-z_]+)", e)}
    assert used, "the dashboard queries nothing"
    missing = used - exported_metric_names()
    assert not missing, f"dashboard uses metrics the services do not export: {missing}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "error rate", "p50", "p99", "batch size", "queue depth"):
        assert topic in titles


def test_prometheus_config_scrapes_every_service() -> None:
    config = yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text())
    ports = {c["job_name"]: c["dns_sd_configs"][0]["port"] for c in config["scrape_configs"]}
    assert ports == {"nnserve-classify": 9101, "nnserve-restore": 9102, "nnserve-generate": 9103}
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus); CI installs it")
    result = subprocess.run(
        [promtool, "check", "config", str(ROOT / "docker/prometheus/prometheus.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"classify", "restore", "generate", "prometheus", "grafana"} <= set(services)
    for name, port in (("classify", 50051), ("restore", 50052), ("generate", 50053)):
        s = services[name]
        assert s["read_only"] and "./models:/models:ro" in s["volumes"]
        assert s["healthcheck"]["test"][-1] == f"127.0.0.1:{port}"
        assert s["restart"] and s["cpus"] and s["mem_limit"]
    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        pytest.skip("docker-compose not installed; CI installs it")
    result = subprocess.run(
        [docker_compose, "-f", str(ROOT / "compose.yaml"), "config", "-q"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_serving_image_has_no_torch_and_runs_as_non_root() -> None:
    dockerfile = (ROOT / "docker/serve.Dockerfile").read_text()
    assert '".[serve]"' in dockerfile and "train" not in re.sub(r"#.*", "", dockerfile)
    assert "USER 10001" in dockerfile and "HEALTHCHECK" in dockerfile


def test_build_context_allowlist_covers_every_copy_source() -> None:
    """.dockerignore keeps .venv (GBs) out of the build context; each COPY source must stay in it."""
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", "the context is an allowlist"
    allowed = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    assert ".venv" not in allowed
    for dockerfile in sorted((ROOT / "docker").glob("*.Dockerfile")):
        for line in dockerfile.read_text().splitlines():
            if not line.startswith("COPY ") or "--from=" in line:
                continue
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            for source in sources:
                source = source.rstrip("/")
                assert any(source == a or source.startswith(a + "/") for a in allowed), (dockerfile.name, source)
                assert (ROOT / source).exists(), (dockerfile.name, source)
