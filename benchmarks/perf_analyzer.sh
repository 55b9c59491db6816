#!/usr/bin/env bash
# Triton's perf_analyzer, unmodified, in its default gRPC mode against an nnserve service.
# It calls ModelMetadata and ModelConfig, then ModelInfer in a loop, and reads ModelStatistics.
#
#   benchmarks/perf_analyzer.sh 127.0.0.1:50051 --concurrency-range 1:16:4
#
# The binary ships in the tritonclient wheel (`make triton-venv`); it needs Debian's libb64-0d and
# libcudart.so.12, which the nvidia-cuda-runtime-cu12 wheel in the same venv provides.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${NNSERVE_TRITON_VENV:-$root/.venv-triton}
[ $# -ge 1 ] || { echo "usage: $0 HOST:PORT [perf_analyzer args...]" >&2; exit 2; }
[ -x "$venv/bin/perf_analyzer" ] || { echo "$venv/bin/perf_analyzer missing: run make triton-venv" >&2; exit 2; }
cudart=$(find "$venv" -name 'libcudart.so.12' -print -quit)
[ -n "$cudart" ] || { echo "libcudart.so.12 not found in $venv (pip install nvidia-cuda-runtime-cu12)" >&2; exit 2; }
export LD_LIBRARY_PATH="$(dirname "$cudart")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
model=${NNSERVE_PA_MODEL:-classifier}
exec "$venv/bin/perf_analyzer" -m "$model" -u "$1" -i grpc "${@:2}"
