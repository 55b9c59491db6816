"""End to end: the Docker Swarm stack (deploy/swarm/stack.yaml) on a real single-node swarm.

`scripts/docker-e2e.sh` (CI's Docker step, `make e2e-swarm`) runs this module after the compose one,
reusing its images, with NNSERVE_E2E_COMPOSE=1 (tests/conftest.py collects tests/e2e only then) and
NNSERVE_E2E_SWARM=1. The fixture joins a swarm (`docker swarm init` when the node is in none, and
leaves it afterwards), deploys classify, restore, generate and Prometheus with `docker stack deploy`
and waits for every task to be healthy. The tests then, in order:

- spread a load test over the two classify tasks through dns:///tasks.classify:50051 and check the
  split in Prometheus;
- run a rolling update (`docker service update --force`, order start-first) under steady load from a
  client with the retry policy (deploy/swarm/steady_load.py), and count failed calls;
- scale classify to 3 and check that Prometheus scrapes the new task and that it gets its share;
- kill a task's container (SIGKILL) under the same load, wait for Swarm to replace it, count failures;
- `docker stack rm` and check that no service, container, network, config or volume is left.

Clients run in containers on the stack's attachable overlay network (the gRPC ports are not
published: see deploy/swarm/stack.yaml), as a client service in the swarm would.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("NNSERVE_E2E_SWARM") != "1", reason="needs the images scripts/docker-e2e.sh builds"
)

ROOT = Path(__file__).resolve().parents[2]
STACK = os.environ.get("NNSERVE_SWARM_STACK", "nnserve-swarm-e2e")
IMAGE = os.environ.get("NNSERVE_IMAGE", "nnserve-serve:e2e")
PROMETHEUS = os.environ.get("NNSERVE_SWARM_PROMETHEUS", "http://127.0.0.1:9090")
NETWORK = f"{STACK}_grpc"
CLASSIFY = f"{STACK}_classify"
TARGET = "dns:///tasks.classify:50051"
SERVICES = {"classify": 2, "restore": 1, "generate": 1}
SELECTOR = 'job="nnserve-classify", grpc_code="OK", grpc_service="nnserve.v1.ClassifyService", grpc_method="Classify"'
PER_INSTANCE = f"sum by (instance) (nnserve_grpc_requests_total{{{SELECTOR}}})"
volumes_key = pytest.StashKey[set[str]]()  # the volumes that existed before the stack


def docker(*args: str, timeout: float = 300, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def wait_until(what: str, ready, timeout: float = 120.0, every: float = 1.0):  # type: ignore[no-untyped-def]
    """Poll ``ready()`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = ready()
        except (OSError, RuntimeError, ValueError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def stack_objects() -> dict[str, list[str]]:
    """Everything of this stack the engine still has, by kind."""
    label = f"label=com.docker.stack.namespace={STACK}"
    found = {
        "services": docker("service", "ls", "-q", "--filter", label).split(),
        "containers": docker("ps", "-aq", "--filter", label).split(),
        "networks": docker("network", "ls", "-q", "--filter", label).split(),
        "configs": docker("config", "ls", "-q", "--filter", label).split(),
    }
    return {kind: ids for kind, ids in found.items() if ids}


def remove_stack() -> None:
    docker("stack", "rm", STACK, check=False)
    wait_until(f"stack {STACK} to be gone", lambda: not stack_objects(), 90)


def running_tasks(service: str) -> list[str]:
    """IDs of the service's tasks that should be running (not the ones shut down or failed)."""
    out = docker("service", "ps", "-q", "--filter", "desired-state=running", f"{STACK}_{service}")
    return out.split()


def healthy_containers(service: str) -> list[str]:
    """Running containers of the service whose healthcheck passes."""
    ids = docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={STACK}_{service}").split()
    if not ids:
        return []
    out = docker("inspect", "-f", "{{.Id}} {{.State.Health.Status}}", *ids)
    return [cid for cid, status in (line.split() for line in out.splitlines()) if status == "healthy"]


def converged(service: str, replicas: int) -> bool:
    return len(running_tasks(service)) == replicas and len(healthy_containers(service)) == replicas


def prometheus(path: str, **params: str) -> dict:
    url = f"{PROMETHEUS}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]


def per_instance_calls() -> dict[str, float]:
    result = prometheus("/api/v1/query", query=PER_INSTANCE)["result"]
    return {r["metric"]["instance"]: float(r["value"][1]) for r in result}


def up_instances(job: str) -> set[str]:
    targets = prometheus("/api/v1/targets")["activeTargets"]
    return {t["labels"]["instance"] for t in targets if t["labels"]["job"] == job and t["health"] == "up"}


def on_network(*args: str, entrypoint: str, detach: bool = False, name: str | None = None) -> str:
    """Run the serving image as a client on the stack's network."""
    flags = ["-d"] if detach else ["--rm"]
    if name:
        flags += ["--name", name]
    mount = f"{ROOT / 'deploy/swarm/steady_load.py'}:/steady_load.py:ro"
    return docker(
        "run", *flags, "--network", NETWORK, "--read-only", "-v", mount, "--entrypoint", entrypoint, IMAGE, *args,
        timeout=180,
    )  # fmt: skip


def fair_split(calls: int, replicas: int) -> dict[str, float]:
    """Send ``calls`` round-robin classify calls; return how many each replica served (Prometheus)."""
    before = per_instance_calls()
    out = on_network(
        "loadtest", TARGET, "--round-robin", "--requests", str(calls), "--warmup", "0",
        "--concurrency", "4", "--channels", "1", "--quiet",
        entrypoint="nnserve",
    )  # fmt: skip
    print(out)

    def counted() -> dict[str, float] | None:
        after = per_instance_calls()
        delta = {i: after[i] - before.get(i, 0.0) for i in after if after[i] > before.get(i, 0.0)}
        return delta if len(delta) == replicas and sum(delta.values()) >= calls else None

    return wait_until(f"Prometheus to count {calls} calls over {replicas} replicas", counted, 60)


@contextmanager
def steady_load() -> Iterator[dict]:
    """Classify load from a retrying round-robin client while the block runs; the dict it yields is
    filled with the client's report (total, ok, failed by code) when the block ends."""
    name = f"{STACK}-load"
    docker("rm", "-f", name, check=False)
    on_network("/steady_load.py", TARGET, "--concurrency", "2", entrypoint="python3", detach=True, name=name)
    report: dict = {}
    try:
        wait_until("the load to flow", lambda: progress(name) >= 200, 60, 0.5)
        yield report
    finally:
        try:
            docker("stop", "-t", "30", name, check=False)
            lines = docker("logs", name).splitlines()
            report.update(json.loads(lines[-1]) if lines else {})
        finally:
            docker("rm", "-f", name, check=False)


def progress(container: str) -> int:
    """Calls the steady-load client has finished so far."""
    lines = [ln for ln in docker("logs", container).splitlines() if ln.startswith('{"progress"')]
    return json.loads(lines[-1])["progress"] if lines else 0


@pytest.fixture(scope="module")
def swarm(request: pytest.FixtureRequest) -> Iterator[None]:
    """The stack, deployed and healthy, on a swarm this fixture joins (and leaves) if needed."""
    started = time.monotonic()
    initialized = docker("info", "-f", "{{.Swarm.LocalNodeState}}").strip() != "active"
    had_gwbridge = bool(docker("network", "ls", "-q", "--filter", "name=^docker_gwbridge$").split())
    if initialized:
        docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    volumes_before = set(docker("volume", "ls", "-q").split())
    ready = False
    try:
        remove_stack()  # whatever an interrupted run left behind
        env = {**os.environ, "NNSERVE_IMAGE": IMAGE}
        env.setdefault("NNSERVE_PROMETHEUS_IMAGE", "nnserve-prometheus:e2e")
        subprocess.run(
            ["docker", "stack", "deploy", "-c", "deploy/swarm/stack.yaml", STACK],
            cwd=ROOT, env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        for service, replicas in SERVICES.items():
            wait_until(f"{replicas} healthy {service} task(s)", lambda s=service, n=replicas: converged(s, n), 180)
        wait_until("Prometheus to scrape every task", lambda: len(up_instances("nnserve-classify")) == 2, 60)
        print(f"\nstack deploy to all tasks healthy and scraped: {time.monotonic() - started:.1f}s")
        request.config.stash[volumes_key] = volumes_before
        ready = True
        yield
    finally:
        try:
            if not ready or request.session.testsfailed:
                print(docker("stack", "ps", "--no-trunc", STACK, check=False))
                for service in SERVICES:
                    logs = subprocess.run(
                        ["docker", "service", "logs", "--tail", "15", f"{STACK}_{service}"],
                        capture_output=True, text=True, timeout=60,
                    )  # fmt: skip
                    print(f"--- {service}\n{(logs.stdout + logs.stderr)[-4000:]}")
        finally:
            remove_stack()
            if initialized:
                docker("swarm", "leave", "--force", check=False)
                if not had_gwbridge:  # swarm init made it; leaving keeps it
                    docker("network", "rm", "docker_gwbridge", check=False)
        print(f"\nswarm module, deploy to teardown: {time.monotonic() - started:.1f}s")


def test_round_robin_spreads_calls_over_the_tasks(swarm: None) -> None:
    delta = fair_split(400, replicas=2)
    print(f"\nround-robin calls per task: {delta}")
    assert min(delta.values()) >= 0.6 * 400 / 2, delta


def test_rolling_update_under_load_fails_no_call(swarm: None) -> None:
    replicas = SERVICES["classify"]
    old_tasks = set(running_tasks("classify"))
    assert len(old_tasks) == replicas
    started = time.monotonic()
    with steady_load() as report:
        docker("service", "update", "--force", "--detach", CLASSIFY)

        def finished() -> str | None:
            state = docker("service", "inspect", "-f", "{{.UpdateStatus.State}}", CLASSIFY).strip()
            assert not state.startswith("rollback"), f"the update rolled back: {state}"
            return state if state == "completed" else None

        wait_until("the rolling update to complete", finished, 180)
        wait_until(f"{replicas} healthy classify tasks", lambda: converged("classify", replicas), 60)
        at_end = progress(f"{STACK}-load")
        wait_until("the load to keep flowing after the update", lambda: progress(f"{STACK}-load") >= at_end + 200, 30)
    print(f"\nrolling update under load ({time.monotonic() - started:.1f}s): {report}")
    assert not set(running_tasks("classify")) & old_tasks, "some task was not replaced"
    assert report["total"] > 0 and report["failed"] == {}, report


def test_scaled_out_task_is_scraped_and_served(swarm: None) -> None:
    replicas = SERVICES["classify"]

    # Prometheus's view settled first: just after the rolling update it may still count a replaced
    # task's address as up (until its next refresh and scrape), which no later view contains.
    def settled() -> set[str] | None:
        up = up_instances("nnserve-classify")
        return up if len(up) == replicas else None

    before = wait_until(f"Prometheus to see {replicas} classify tasks", settled, 90)
    docker("service", "scale", "--detach", f"{CLASSIFY}={replicas + 1}")
    wait_until(f"{replicas + 1} healthy classify tasks", lambda: converged("classify", replicas + 1), 180)
    after = wait_until("Prometheus to find the new task", lambda: (up := up_instances("nnserve-classify")) - before
                       and len(up) == replicas + 1 and up, 90)  # fmt: skip
    print(f"\nPrometheus scrapes classify at {sorted(after)}")
    delta = fair_split(600, replicas=replicas + 1)
    print(f"round-robin calls per task after scaling: {delta}")
    assert min(delta.values()) >= 0.6 * 600 / (replicas + 1), delta


def test_killed_task_is_replaced_and_no_call_fails(swarm: None) -> None:
    victim = healthy_containers("classify")[0]
    victim_task = docker("inspect", "-f", '{{index .Config.Labels "com.docker.swarm.task.id"}}', victim).strip()
    started = time.monotonic()
    with steady_load() as report:
        docker("kill", victim)  # SIGKILL: no drain, connections reset mid-call
        wait_until(
            "Swarm to replace the killed task",
            lambda: victim_task not in running_tasks("classify") and converged("classify", 3),
            120,
        )
        at_end = progress(f"{STACK}-load")
        wait_until("the load to keep flowing after the kill", lambda: progress(f"{STACK}-load") >= at_end + 200, 30)
    print(f"\nkilled task under load ({time.monotonic() - started:.1f}s): {report}")
    assert report["total"] > 0 and report["failed"] == {}, report


def test_stack_rm_leaves_nothing_behind(swarm: None, request: pytest.FixtureRequest) -> None:
    docker("stack", "rm", STACK)
    wait_until("every object of the stack to go", lambda: not stack_objects(), 90)
    assert docker("network", "ls", "-q", "--filter", f"name={NETWORK}").split() == []
    left = set(docker("volume", "ls", "-q").split()) - request.config.stash[volumes_key]
    assert not left, f"volumes left behind: {left}"
