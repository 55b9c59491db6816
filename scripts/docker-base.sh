#!/usr/bin/env bash
# Build a Debian bookworm base image with Python 3.11 for machines that have no image registry:
# debootstrap a minimal root, give it a venv at /opt/python (first on PATH, so `python3 -m pip`
# works as in python:3.11-slim), trim caches and docs, and `docker import` it.
#
#   bash scripts/docker-base.sh [TAG]         # default nnserve-base:bookworm; skips if it exists
#   FRESH=1 bash scripts/docker-base.sh       # rebuild even if it exists (CI does)
#
# Needs root, debootstrap and a running Docker engine. MIRROR overrides the Debian mirror.
set -euo pipefail
tag=${1:-nnserve-base:bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
if [ "${FRESH:-0}" = 1 ]; then
    docker image rm -f "$tag" >/dev/null 2>&1 || true
elif docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag exists"
    exit 0
fi
root=$(mktemp -d /var/tmp/nnserve-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm into $root ($mirror)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null
chroot "$root" python3 -m venv /opt/python
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$tag" >/dev/null
echo "built $tag: $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')"
