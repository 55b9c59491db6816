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


DASHBOARD = ROOT / "docker/grafana/dashboards/nnserve.json"
ALERTS = ROOT / "docker/prometheus/alerts.yml"


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard: panel targets and template variables."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return exprs + [v["query"] for v in dashboard["templating"]["list"]]


def concrete(expr: str, version: str = ".*") -> str:
    """A dashboard query with Grafana's variables replaced as Grafana does when 'All' is chosen."""
    expr = expr.replace("$__range", "5m").replace("$version", version)
    return expr.replace("$service", ".*").replace("$instance", ".*")


def test_dashboard_queries_only_exported_metrics() -> None:
    exprs = dashboard_queries()
    used = {m for e in exprs for m in re.findall(r"\b(nnserve_[a-z_]+)", e)}
    assert used, "the dashboard queries nothing"
    missing = used - exported_metric_names()
    assert not missing, f"dashboard uses metrics the services do not export: {missing}"
    # Every metric family the services export is on some panel (a new one needs a panel, or a reason).
    families = {f.name for f in Metrics(CollectorRegistry(), "x").registry.collect()}
    unshown = {f for f in families if not any(u.startswith(f) for u in used)}
    assert not unshown, f"exported but on no panel: {unshown}"
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "request rate",
        "error rate",
        "p50",
        "p99",
        "batch size",
        "queue depth",
        "shed",
        "reloads",
        "images/s",
        "steps/s",
        "rows per denoiser call",
        "per replica",
        "versions served",
        "http",
    ):
        assert topic in titles, topic


def test_dashboard_slices_by_replica_and_version() -> None:
    """Each metric selector filters on the service and replica variables; the version variable
    narrows every panel to the replicas serving that version."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["service", "instance", "version"]
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            selectors = re.findall(r"\bnnserve_[a-z_]+(\{[^}]*\})?", target["expr"])
            assert selectors and all('instance=~"$instance"' in s and 'service=~"$service"' in s for s in selectors), (
                panel["title"],
                target["expr"],
            )
            if panel["title"] != "Model reloads":  # reloads are counted whichever version they brought
                assert 'version=~"$version"' in target["expr"], panel["title"]


def test_dashboard_queries_parse(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """promtool parses every dashboard query (as recording rules), so a typo fails here, not in Grafana."""
    promtool = _promtool()
    rules = [
        {"record": f"dashboard:query_{i}", "expr": concrete(e)}
        for i, e in enumerate(dashboard_queries())
        if not e.startswith("label_values(")
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generation_panels_compute_what_their_titles_say(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """promtool evaluates the generation panels over synthetic series from two replicas: replica b
    serves denoiser version 2 and merges 8 rows per call at 4 calls/s, replica a version 1."""
    promtool = _promtool()
    dashboard = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in dashboard["panels"]}
    rows_per_call = panels["Generation: rows per denoiser call"]["targets"][0]["expr"]
    speed = panels["Generation: GAN images/s and denoiser steps/s"]["targets"]
    labels = 'service="generate",model="diffusion_denoiser"'
    a, b = 'instance="a:9103",version="1"', 'instance="b:9103",version="2"'  # the replicas and their versions
    series = [
        {"series": f"nnserve_model_executions_total{{{labels},{a}}}", "values": "0+60x10"},
        {"series": f"nnserve_model_inference_rows_total{{{labels},{a}}}", "values": "0+120x10"},
        {"series": f"nnserve_model_executions_total{{{labels},{b}}}", "values": "0+240x10"},
        {"series": f"nnserve_model_inference_rows_total{{{labels},{b}}}", "values": "0+1920x10"},
        {
            "series": f'nnserve_model_info{{{labels},instance="a:9103",version="1",provider="CPU",precision="fp32"}}',
            "values": "1x10",
        },
        {
            "series": f'nnserve_model_info{{{labels},instance="b:9103",version="2",provider="CPU",precision="fp32"}}',
            "values": "1x10",
        },
        {
            "series": 'nnserve_model_inference_rows_total{service="generate",model="gan_generator",instance="a:9103",'
            'version="1"}',
            "values": "0+300x10",
        },
        {
            "series": 'nnserve_model_info{service="generate",model="gan_generator",instance="a:9103",version="1",'
            'provider="CPU",precision="fp32"}',
            "values": "1x10",
        },
    ]
    out = {"service": "generate", "model": "diffusion_denoiser"}
    gan = {"service": "generate", "model": "gan_generator"}
    expr_tests = [
        # version 2 only: replica b, 1920 rows / 240 calls per minute
        {
            "expr": concrete(rows_per_call, "2"),
            "eval_time": "5m",
            "exp_samples": [{"labels": _labels(out), "value": 8}],
        },
        # both versions: (120 + 1920) / (60 + 240)
        {"expr": concrete(rows_per_call), "eval_time": "5m", "exp_samples": [{"labels": _labels(out), "value": 6.8}]},
        {"expr": concrete(speed[0]["expr"]), "eval_time": "5m", "exp_samples": [{"labels": _labels(gan), "value": 5}]},
        {"expr": concrete(speed[1]["expr"]), "eval_time": "5m", "exp_samples": [{"labels": _labels(out), "value": 5}]},
        {
            "expr": concrete(speed[1]["expr"], "1"),
            "eval_time": "5m",
            "exp_samples": [{"labels": _labels(out), "value": 1}],
        },
    ]
    path = tmp_path / "dashboard_test.yml"
    test = {"interval": "1m", "input_series": series, "promql_expr_test": expr_tests}
    path.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": [test]}))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus); CI installs it")
    return promtool


def test_alerting_rules_pass_promtool_check_and_their_unit_tests() -> None:
    """docker/prometheus/alerts.yml: error ratio, p99 over budget, shedding, target down, rejected
    reload; tests/prometheus_alerts_test.yml fires each on synthetic series and keeps each quiet
    where it must (client errors, cancellations, a generate call inside its budget)."""
    promtool = _promtool()
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    alerts = {r["alert"] for g in groups for r in g["rules"]}
    assert {"NnserveHighErrorRatio", "NnserveHighLatencyP99", "NnserveShedding", "NnserveTargetDown"} <= alerts
    used = {m for g in groups for r in g["rules"] for m in re.findall(r"\b(nnserve_[a-z_]+)", r["expr"])}
    assert used <= exported_metric_names(), used - exported_metric_names()
    tests = ROOT / "tests/prometheus_alerts_test.yml"
    tested = {t["alertname"] for case in yaml.safe_load(tests.read_text())["tests"] for t in case["alert_rule_test"]}
    assert tested == alerts, alerts ^ tested
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_scrapes_every_service() -> None:
    config = yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text())
    ports = {c["job_name"]: c["dns_sd_configs"][0]["port"] for c in config["scrape_configs"]}
    assert ports == {
        "nnserve-classify": 9101,
        "nnserve-restore": 9102,
        "nnserve-generate": 9103,
        "nnserve-console": 9104,
    }
    assert config["rule_files"] == ["alerts.yml"]  # beside prometheus.yml: in the image and in compose
    prometheus_image = (ROOT / "docker/prometheus.Dockerfile").read_text()
    assert "COPY docker/prometheus/prometheus.yml docker/prometheus/alerts.yml /etc/prometheus/" in prometheus_image
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert (
        "./docker/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["services"]["prometheus"]["volumes"]
    )
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
    # No train extra or training code ("constraints" contains the letters, hence the word match).
    assert '".[serve]"' in dockerfile and not re.search(r"\btrain", re.sub(r"#.*", "", dockerfile))
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
