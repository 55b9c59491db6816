"""Generation throughput, and step-level batching on vs off, side by side in one run.

    python benchmarks/generate_bench.py --out benchmarks/results/generate.json

Starts the generate service twice on the shipped models (step batching on, then off), each
pinned to core 0 with one onnxruntime thread, while this client runs on core 1. Scenarios:
GAN (16 concurrent requests of 1 image), diffusion DDIM at 10 and 50 steps with 1 and 16
concurrent single-image requests. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.client import GenerateClient  # noqa: E402
from services.proto.nnserve.v1 import generate_pb2_grpc  # noqa: E402


def start(
    step_batching: bool, workdir: Path, repository: Path, providers: str = "CPUExecutionProvider"
) -> tuple[subprocess.Popen[bytes], str]:
    port_file = workdir / f"generate-{step_batching}.json"
    command = [
        "taskset",
        "-c",
        "0",
        sys.executable,
        "-m",
        "services.generate",
        "--port",
        "0",
        "--metrics-port",
        "none",
        "--intra-op-threads",
        "1",
        "--step-batching",
        str(step_batching).lower(),
        "--port-file",
        str(port_file),
        "--model-repository",
        str(repository),
        "--providers",
        providers,
    ]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("generate service did not start")
        time.sleep(0.1)
    return proc, f"127.0.0.1:{json.loads(port_file.read_text())['port']}"


async def scenario(address: str, model: str, concurrency: int, steps: int, rounds: int) -> dict[str, float]:
    """``rounds`` waves of ``concurrency`` simultaneous single-image requests; images/s over all."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        latencies: list[float] = []

        async def one(seed: int) -> None:
            started = time.perf_counter()
            await stub.Generate(
                GenerateClient.request(model=model, count=1, steps=steps, seed=seed, output="tensor"), timeout=600
            )
            latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm-up wave
        latencies.clear()
        started = time.perf_counter()
        for r in range(rounds):
            await asyncio.gather(*(one(1000 * r + i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "images_per_s": round(concurrency * rounds / elapsed, 2),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "models")
    parser.add_argument(
        "--providers",
        default="CPUExecutionProvider",
        help="onnxruntime providers for the server, comma-separated (CUDAExecutionProvider on a GPU machine)",
    )
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {1})
    plan = [("gan", 16, 0), ("diffusion", 1, 10), ("diffusion", 16, 10), ("diffusion", 1, 50), ("diffusion", 16, 50)]
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for step_batching in (True, False):
            mode = "step_batching_on" if step_batching else "step_batching_off"
            proc, address = start(step_batching, Path(tmp), args.model_repository, args.providers)
            try:
                for model, concurrency, steps in plan:
                    if model == "gan" and not step_batching:
                        continue
                    key = f"{model} c={concurrency}" + (f" steps={steps}" if steps else "")
                    results.setdefault(key, {})[mode] = r = asyncio.run(
                        scenario(address, model, concurrency, steps, args.rounds)
                    )
                    print(
                        f"{mode:<18} {key:<28} {r['images_per_s']:>8.2f} images/s  p50 {r['p50_ms']:>8.1f} ms",
                        flush=True,
                    )
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    on, off = (
        results["diffusion c=16 steps=50"]["step_batching_on"],
        results["diffusion c=16 steps=50"]["step_batching_off"],
    )
    ratio = on["images_per_s"] / off["images_per_s"]
    print(f"\nstep-level batching, 16 concurrent single-image requests, DDIM 50: {ratio:.2f}x images/s")
    report = {
        "results": results,
        "step_batching_ratio_c16_ddim50": round(ratio, 2),
        "pinning": "server core 0 (1 thread), client core 1",
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
