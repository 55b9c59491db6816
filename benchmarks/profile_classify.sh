#!/usr/bin/env bash
# Where the classify service spends its time at 16 single-image callers: py-spy samples the server
# (pinned to core 0, one onnxruntime thread) while nnserve loadtest (core 1) drives it.
#   benchmarks/profile_classify.sh [seconds]   -> benchmarks/results/profile_classify_c16.txt (+ .svg)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
port=${NNSERVE_BENCH_PORT:-50098}
mkdir -p benchmarks/results
taskset -c 0 .venv/bin/python -m services.classify --port "$port" --metrics-port none --intra-op-threads 1 \
  --model-poll-interval-s 0 --model-version 1 --workers 1 ${NNSERVE_PROFILE_ARGS:-} >/tmp/nnserve-profile.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do .venv/bin/nnserve health "127.0.0.1:$port" >/dev/null 2>&1 && break; sleep 0.1; done
taskset -c 1 .venv/bin/nnserve loadtest "127.0.0.1:$port" -c 16 --duration $((seconds + 4)) --warmup 1 --quiet &
load=$!
sleep 2
.venv/bin/py-spy record --pid "$server" --duration "$seconds" --rate 200 --format speedscope \
  --output benchmarks/results/profile_classify_c16.speedscope.json --nonblocking >/dev/null 2>&1 || true
.venv/bin/py-spy record --pid "$server" --duration "$seconds" --rate 200 --format raw \
  --output /tmp/nnserve-profile.raw --nonblocking >/dev/null 2>&1
wait $load
# Summarise collapsed stacks: share of samples per leaf-most project or library frame.
python3 - <<'PY' > benchmarks/results/profile_classify_c16.txt
import collections
total = 0
own = collections.Counter()
for line in open("/tmp/nnserve-profile.raw"):
    stack, _, count = line.rstrip().rpartition(" ")
    n = int(count)
    total += n
    frames = stack.split(";")
    own[frames[-1]] += n
print(f"py-spy, {total} samples of the classify server at 16 callers; top frames by own time:")
for frame, n in own.most_common(25):
    print(f"{100 * n / total:5.1f}%  {frame}")
PY
cat benchmarks/results/profile_classify_c16.txt
