#!/usr/bin/env bash
# First throughput figures for the classify service: server pinned to core 0 with one onnxruntime
# thread, load generator pinned to core 1, beside in-process onnxruntime on the same core.
#   benchmarks/classify_quick.sh [seconds per scenario]
# The full suite (peers, transport floor, plots) is the benchmark issue's; this is the quick check.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-5}
port=${NNSERVE_BENCH_PORT:-50099}
taskset -c 0 .venv/bin/python -m services.classify --port "$port" --metrics-port none --intra-op-threads 1 >/tmp/nnserve-bench.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do .venv/bin/nnserve health "127.0.0.1:$port" >/dev/null 2>&1 && break; sleep 0.1; done
for args in "-c 1" "-c 16" "-c 64" "-c 4 -n 64"; do
  # shellcheck disable=SC2086
  taskset -c 1 .venv/bin/nnserve loadtest "127.0.0.1:$port" $args --duration "$seconds" --warmup 1 --quiet --payload samples
done
taskset -c 0 .venv/bin/python - "$seconds" <<'PY'
import sys, time
import numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession("models/classifier/1/model.onnx", options, providers=["CPUExecutionProvider"])
for batch in (1, 64):
    x = np.random.rand(batch, 1, 28, 28).astype(np.float32)
    for _ in range(20):
        session.run(None, {"image": x})
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < float(sys.argv[1]):
        session.run(None, {"image": x})
        calls += 1
    elapsed = time.perf_counter() - start
    print(f"in-process onnxruntime, 1 thread, batch {batch}: {calls * batch / elapsed:.0f} images/s ({elapsed / calls * 1000:.2f} ms per call)")
PY
