#!/usr/bin/env bash
# End-to-end test of the Docker deployment on a machine with no image registry (CI's Docker step):
#   1. install docker.io, docker-compose and debootstrap if missing; start dockerd if none runs
#   2. build a Debian base with Python locally (scripts/docker-base.sh)
#   3. download the serve wheels on the host into docker/wheels/ and build the serving image
#      from them (WHEELS=local), and a Prometheus image from Debian's prometheus package
#   4. run tests/e2e (docker-compose up, health, classify/restore/generate/OIP from the host,
#      Prometheus targets and counters, --scale classify=2 with round-robin), which tears down
#   4b. run tests/e2e/test_swarm.py: the same images as a Docker Swarm stack (see its block below)
#   5. stop dockerd if this script started it
# Prints each phase's time and the image sizes. Needs root. PYTHON: the venv with nnserve[dev].
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
started=$(date +%s)
phase() { echo "[docker-e2e +$(( $(date +%s) - started ))s] $*"; }

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    phase "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

dockerd_pid=""
stop_dockerd() {
    if [ -n "$dockerd_pid" ]; then
        phase "stopping dockerd"
        kill "$dockerd_pid" 2>/dev/null || true
        wait "$dockerd_pid" 2>/dev/null || true
    fi
}
trap stop_dockerd EXIT
if ! docker info >/dev/null 2>&1; then
    phase "starting dockerd (log: /var/log/nnserve-dockerd.log)"
    dockerd >/var/log/nnserve-dockerd.log 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { tail -20 /var/log/nnserve-dockerd.log; exit 1; }
fi

export NNSERVE_BASE_IMAGE=${NNSERVE_BASE_IMAGE:-nnserve-base:bookworm}
export NNSERVE_WHEELS=local NNSERVE_TAG=e2e NNSERVE_PROMETHEUS_IMAGE=nnserve-prometheus:e2e
phase "base image $NNSERVE_BASE_IMAGE"
bash scripts/docker-base.sh "$NNSERVE_BASE_IMAGE"

phase "downloading the serve wheels into docker/wheels/"
"$PYTHON" -m pip download -q -d docker/wheels -c constraints/serve.txt '.[serve]' 'setuptools>=77' 2>&1 | grep -v "is ignored" || true
phase "building nnserve-serve:$NNSERVE_TAG"
docker-compose -f compose.yaml build -q classify
phase "building $NNSERVE_PROMETHEUS_IMAGE from Debian's prometheus package"
docker build -q -f docker/prometheus.Dockerfile --build-arg BASE_IMAGE="$NNSERVE_BASE_IMAGE" \
    -t "$NNSERVE_PROMETHEUS_IMAGE" . >/dev/null
docker image ls --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E "nnserve-(serve|prometheus):e2e|$NNSERVE_BASE_IMAGE" || true

status=0
if [ "${E2E_ONLY:-}" != swarm ]; then
    phase "running tests/e2e"
    NNSERVE_E2E_COMPOSE=1 "$PYTHON" -m pytest tests/e2e -q -s -p no:cacheprovider \
        --ignore=tests/e2e/test_swarm.py || status=$?
fi

# --- Docker Swarm (deploy/swarm/stack.yaml, tests/e2e/test_swarm.py): the same images as a stack on
# a single-node swarm: round-robin over tasks, scale-out, a rolling update and a killed task under
# load. The test inits the swarm if the node is in none and leaves it (and its docker_gwbridge)
# afterwards. E2E_ONLY=swarm (make e2e-swarm) runs only this part. About 2.5 minutes.
swarm_started=$(date +%s)
swarm_before=$(docker info -f '{{.Swarm.LocalNodeState}}')
phase "running tests/e2e/test_swarm.py (Docker Swarm)"
NNSERVE_E2E_COMPOSE=1 NNSERVE_E2E_SWARM=1 NNSERVE_IMAGE="nnserve-serve:$NNSERVE_TAG" \
    "$PYTHON" -m pytest tests/e2e/test_swarm.py -q -s -p no:cacheprovider || status=$?
if [ "$swarm_before" != active ] && [ "$(docker info -f '{{.Swarm.LocalNodeState}}')" = active ]; then
    phase "leaving the swarm a killed test left behind"  # else the next dockerd starts as a manager
    docker swarm leave --force >/dev/null || true
    docker network rm docker_gwbridge >/dev/null 2>&1 || true
fi
phase "Swarm step finished in $(( $(date +%s) - swarm_started ))s"
# --- end of the Docker Swarm part

phase "done (pytest exit $status)"
exit $status
