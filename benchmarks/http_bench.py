"""HTTP rows: nnserve's OIP REST endpoint beside KServe's and MLServer's own, one client for all.

    python benchmarks/http_bench.py                       # about 2 minutes; prints the table
    python benchmarks/http_bench.py --seconds 1 --concurrency 1 16    # a quick smoke run
    python benchmarks/http_bench.py --write               # also writes its section of BENCHMARKS.md

Every server runs pinned to core 0 with one onnxruntime thread on models/classifier/1 (the peers
from benchmarks/peers/, in their venvs when present: make bench-venvs); the client, one process on
core 1, is a closed-loop aiohttp caller: C callers each send ``POST /v2/models/classifier/infer`` with
one 28x28 image as JSON tensor data (what every v2 REST server accepts), or, for nnserve, also as
Triton binary tensor data. Beside throughput and latency, each row has the server's CPU time per
request (from /proc, its threads and children): unlike req/s, it hardly moves on a busy machine.
Then Triton's perf_analyzer (.venv-triton) measures nnserve at 16 callers over gRPC and over HTTP,
so the HTTP-vs-gRPC ratio comes from one C++ client for both protocols.
Results go to benchmarks/results/http.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run import MARK_BEGIN, MARK_END, PY, free_port, mlserver_folder  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODEL = ROOT / "models" / "classifier" / "1" / "model.onnx"


def wait_http(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200")


@contextmanager
def server(name: str, workdir: Path) -> Iterator[tuple[int, int, int]]:
    """Start ``name`` (nnserve, kserve, mlserver) pinned to core 0; yields (HTTP port, gRPC port, pid)."""
    grpc_port, http_port = free_port(), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cwd = ROOT
    if name == "nnserve":
        command = [PY, "-m", "services.classify", "--port", str(grpc_port), "--http-port", str(http_port)]
        command += ["--metrics-port", "none", "--intra-op-threads", "1", "--max-queue-size", "4096"]
        command += ["--model-poll-interval-s", "0", "--model-repository", str(MODEL.parent.parent.parent)]
        command += ["--workers", "1", "--model-version", "1"]  # the file the peers load
    elif name == "kserve":
        command = [str(ROOT / ".venv-kserve/bin/python"), "benchmarks/peers/kserve_server.py", "--model", str(MODEL)]
        command += ["--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    elif name == "mlserver":
        command, cwd = mlserver_folder(workdir, MODEL, grpc_port, http_port)
        env["PYTHONPATH"] = str(cwd)
    else:
        raise ValueError(name)
    log = open(workdir / f"{name}.log", "wb")
    proc = subprocess.Popen(["taskset", "-c", "0", *command], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{http_port}/v2/models/classifier/ready")
        time.sleep(0.5)
        yield http_port, grpc_port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its descendants so far."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def inference_count(http_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/classifier/stats", timeout=10) as reply:
        return int(json.loads(reply.read())["model_stats"][0]["inference_count"])


def request_body(binary: bool) -> tuple[bytes, dict[str, str]]:
    """One 28x28 image as an OIP REST inference request, JSON or Triton binary tensor data."""
    import numpy as np

    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    tensor: dict[str, object] = {"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28]}
    if not binary:
        tensor["data"] = x.ravel().tolist()
        return json.dumps({"inputs": [tensor]}).encode(), {"Content-Type": "application/json"}
    tensor["parameters"] = {"binary_data_size": x.nbytes}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    return header + x.tobytes(), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


async def closed_loop(url: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float) -> dict:
    """C callers, each sending the next request when its reply arrives; 1 s of warm-up not counted."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    total = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        measure_from, stop_at = start + 1.0, start + 1.0 + seconds

        async def caller() -> None:
            nonlocal errors, total
            while (now := time.perf_counter()) < stop_at:
                async with session.post(url, data=body, headers=headers) as reply:
                    await reply.read()
                    ok = reply.status == 200
                total += 1
                done = time.perf_counter()
                if now >= measure_from:
                    if ok:
                        latencies.append(done - now)
                    else:
                        errors += 1

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    latencies.sort()

    def pct(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    report = {"rps": len(latencies) / seconds, "p50_ms": pct(0.5), "p99_ms": pct(0.99), "errors": errors}
    return report | {"total": total}


def load(url: str, binary: bool, concurrency: int, seconds: float) -> dict:
    """Run the client in its own process on core 1, so it never shares a core with the server."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = ["taskset", "-c", "1", PY, __file__, "--client", url, "--out", out.name]
        command += ["--seconds", str(seconds), "--concurrency", str(concurrency)]
        subprocess.run([*command, *(["--binary"] if binary else [])], cwd=ROOT, check=True)
        return json.loads(Path(out.name).read_text())


def perf_analyzer(address: str, protocol: str, concurrency: int, seconds: float) -> dict:
    """perf_analyzer's client throughput and p99 for one protocol (empty without .venv-triton)."""
    if not (ROOT / ".venv-triton" / "bin" / "perf_analyzer").exists():
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "pa.csv"
        command = ["taskset", "-c", "1", str(ROOT / "benchmarks" / "perf_analyzer.sh"), address, "-i", protocol]
        command += ["--concurrency-range", str(concurrency), "--measurement-interval", str(int(seconds * 1000))]
        command += ["--stability-percentage", "100", "-f", str(csv)]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
        header, row = csv.read_text().splitlines()[:2]
        fields = dict(zip(header.split(","), row.split(","), strict=False))
        throughput = re.search(r"Throughput: ([\d.]+) infer/sec", result.stdout)
        return {
            "rps": float(fields["Inferences/Second"]),
            "p99_ms": float(fields["p99 latency"]) / 1000,
            "output": result.stdout[result.stdout.find("Request concurrency") :].strip(),
            "throughput_line": throughput.group(0) if throughput else "",
        }


def markdown(results: dict) -> str:
    lines = [
        "## HTTP (OIP REST): nnserve beside KServe and MLServer",
        "",
        "`python benchmarks/http_bench.py` (server on core 0, one onnxruntime thread, models/classifier/1; one",
        f"aiohttp client process on core 1, closed loop, one image per request, {results['seconds']:g} s per point).",
        "",
        "| server | body | callers | req/s | p50 ms | p99 ms | errors | server CPU per request |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['server']} | {row['body']} | {row['concurrency']} | {row['rps']:.0f} | {row['p50_ms']:.2f} | "
            f"{row['p99_ms']:.2f} | {row['errors']} | {row['server_cpu_us']:.0f} us |"
        )
    pa = results.get("perf_analyzer", {})
    if pa.get("grpc") and pa.get("http"):
        ratio = pa["http"]["rps"] / pa["grpc"]["rps"]
        lines += [
            "",
            f"perf_analyzer against nnserve at {results['pa_concurrency']} callers: "
            f"gRPC {pa['grpc']['rps']:.0f} infer/s "
            f"(p99 {pa['grpc']['p99_ms']:.2f} ms), HTTP {pa['http']['rps']:.0f} infer/s (p99 "
            f"{pa['http']['p99_ms']:.2f} ms): HTTP/gRPC = {ratio:.2f}; server CPU per inference gRPC "
            f"{pa['grpc']['server_cpu_us']:.0f} us, HTTP {pa['http']['server_cpu_us']:.0f} us.",
        ]
    return "\n".join(lines) + "\n"


def write_benchmarks_md(section: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    block = f"{MARK_BEGIN}\n{section}{MARK_END}\n"
    if MARK_BEGIN in text and MARK_END in text:
        text = text[: text.index(MARK_BEGIN)] + block + text[text.index(MARK_END) + len(MARK_END) + 1 :]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="callers per point")
    parser.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # internal: run the client against this URL
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--binary", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        body, headers = request_body(args.binary)
        report = asyncio.run(closed_loop(args.client, body, headers, args.concurrency[0], args.seconds))
        Path(args.out).write_text(json.dumps(report))
        return 0
    peers = [p for p in ("kserve", "mlserver") if (ROOT / f".venv-{p}").exists()]
    results: dict = {"seconds": args.seconds, "rows": [], "pa_concurrency": 16}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["nnserve", *peers]:
            with server(name, Path(tmp)) as (http_port, grpc_port, pid):
                url = f"http://127.0.0.1:{http_port}/v2/models/classifier/infer"
                for binary in (False, True) if name == "nnserve" else (False,):
                    for concurrency in args.concurrency:
                        cpu = cpu_seconds(pid)
                        row = load(url, binary, concurrency, args.seconds)
                        row["server_cpu_us"] = (cpu_seconds(pid) - cpu) / max(1, row["total"]) * 1e6
                        row |= {"server": name, "body": "binary" if binary else "JSON", "concurrency": concurrency}
                        results["rows"].append(row)
                        print(json.dumps(row), flush=True)
                if name == "nnserve":
                    results["perf_analyzer"] = {}
                    for protocol, address in (("grpc", f"127.0.0.1:{grpc_port}"), ("http", f"127.0.0.1:{http_port}")):
                        cpu, count = cpu_seconds(pid), inference_count(http_port)
                        pa = perf_analyzer(address, protocol, 16, args.seconds)
                        if pa:
                            served = max(1, inference_count(http_port) - count)
                            pa["server_cpu_us"] = (cpu_seconds(pid) - cpu) / served * 1e6
                        results["perf_analyzer"][protocol] = pa
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "http.json").write_text(json.dumps(results, indent=2))
    section = markdown(results)
    print(section)
    for protocol, pa in results.get("perf_analyzer", {}).items():
        if pa:
            print(f"perf_analyzer -i {protocol}:\n{pa['output']}\n")
    if args.write:
        write_benchmarks_md(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
