"""Model-level speed in one run: INT8 against FP32, and DPM-Solver++ against DDIM-50.

    python benchmarks/model_speed.py --seconds 10 --out benchmarks/results/model_speed.json
    python benchmarks/model_speed.py --seconds 0.5 --rounds 1 --smoke     # seconds-long check of the script

Three measurements, servers pinned to core 0 with one onnxruntime thread and clients on core 1
(as benchmarks/run.py), on the shipped models:

1. in-process onnxruntime, one thread: ms per call of the classifier and the autoencoder, FP32
   file against INT8 file, at batch 1 and 64 (``training.evaluate.inference_ms``);
2. the classify service started with ``--precision fp32`` and ``--precision int8``, loaded by
   ``nnserve loadtest`` with 16 closed-loop callers: requests/s and p50/p99;
3. the generate service: images/s of single-image diffusion requests with DDIM at 50 steps and
   DPM-Solver++(2M) at ``--fast-steps`` (10), with 1 and 16 concurrent callers.

Prints a Markdown table and writes JSON (``--out``) and the table beside it (``.md``).
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from services.processes import launch, wait_until_serving  # noqa: E402
from services.proto.nnserve.v1 import generate_pb2, generate_pb2_grpc  # noqa: E402

PY = sys.executable


def pinned(core: int, command: list[str]) -> list[str]:
    """``command`` pinned to ``core`` when the machine has two cores to split; unpinned otherwise."""
    return ["taskset", "-c", str(core), *command] if len(os.sched_getaffinity(0)) >= 2 else command


def in_process(model: str, batch: int, seconds: float) -> dict[str, float]:
    """FP32 and INT8 ms per call of ``model`` at ``batch`` on one thread, in a process pinned to core 0."""
    code = f"""
import json, numpy as np
from pathlib import Path
from training.evaluate import inference_ms
d = Path("models/{model}/1")
x = np.random.default_rng(0).random(({batch}, 1, 28, 28), dtype=np.float32)
feed = {{"image": x}} if "{model}" == "classifier" else {{"image": x, "mask": np.zeros_like(x)}}
a, b = inference_ms(d / "model.onnx", feed, {seconds}), inference_ms(d / "model.int8.onnx", feed, {seconds})
print(json.dumps({{"fp32_ms": round(a, 4), "int8_ms": round(b, 4), "speedup": round(a / b, 2)}}))
"""
    result = subprocess.run(pinned(0, [PY, "-c", code]), cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@contextmanager
def service(module: str, workdir: Path, *args: str) -> Iterator[str]:
    """``python -m module`` on a free port, core 0, one worker and one thread; yields its address."""
    flags = ["--port", "0", "--metrics-port", "none", "--http-port", "none", "--intra-op-threads", "1"]
    flags += ["--workers", "1", "--model-poll-interval-s", "0", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNSERVE_")}
    port_file = workdir / f"{module}-{time.monotonic_ns()}.json"
    with open(port_file.with_suffix(".log"), "wb") as log:
        launched = launch(module, flags, port_file, prefix=pinned(0, []), env=env, cwd=ROOT, output=log)
        try:
            wait_until_serving([launched], 90)
            yield f"127.0.0.1:{launched.info['port']}"
        finally:
            launched.stop(timeout=30)


def classify_load(address: str, seconds: float, concurrency: int, images: int = 1) -> dict[str, float]:
    """``nnserve loadtest`` (pinned to core 1) against the classify service: requests/s, images/s, p50, p99."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [PY, "-m", "services.loadtest", address, "--rpc", "classify", "--concurrency", str(concurrency)]
        command += ["--images-per-request", str(images)]
        command += ["--duration", str(seconds), "--warmup", "1", "--quiet", "--json", out.name]
        subprocess.run(pinned(1, command), cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        report = json.loads(Path(out.name).read_text())
    return {
        "requests_per_s": report["requests_per_s"],
        "images_per_s": report["images_per_s"],
        "p50_ms": report["latency_ms"]["p50"],
        "p99_ms": report["latency_ms"]["p99"],
        "errors": sum(report["errors"].values()),
    }


def diffusion_request(sampler: int, steps: int, seed: int) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(
        model=generate_pb2.GENERATOR_MODEL_DIFFUSION, count=1, seed=seed, output=generate_pb2.GENERATE_OUTPUT_TENSOR
    )
    request.diffusion.sampler, request.diffusion.steps = sampler, steps
    return request


async def generate_load(address: str, sampler: int, steps: int, concurrency: int, rounds: int) -> dict[str, float]:
    """``rounds`` waves of ``concurrency`` simultaneous single-image requests (after one warm-up wave)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        latencies: list[float] = []

        async def one(seed: int) -> None:
            started = time.perf_counter()
            await stub.Generate(diffusion_request(sampler, steps, seed), timeout=900)
            latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(one(i) for i in range(concurrency)))
        latencies.clear()
        started = time.perf_counter()
        for r in range(rounds):
            await asyncio.gather(*(one(1000 * (r + 1) + i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "images_per_s": round(concurrency * rounds / elapsed, 3),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
    }


def markdown(results: dict) -> str:
    lines = ["| measurement | FP32 / DDIM-50 | INT8 / DPM-Solver++ | ratio |", "|---|---|---|---|"]
    for key, r in results["in_process"].items():
        lines.append(f"| in-process {key}, 1 thread (ms/call) | {r['fp32_ms']} | {r['int8_ms']} | {r['speedup']}x |")
    c = results["classify_service"]
    lines.append(
        f"| classify service, {c['concurrency']} callers (requests/s) | {c['fp32']['requests_per_s']:.0f} "
        f"| {c['int8']['requests_per_s']:.0f} | {c['speedup']}x |"
    )
    if "fp32 64x4" in c:
        lines.append(
            f"| classify service, 4 callers x 64 images (images/s) | {c['fp32 64x4']['images_per_s']:.0f} "
            f"| {c['int8 64x4']['images_per_s']:.0f} | {c['speedup 64x4']}x |"
        )
    for key, r in results["generate_service"].items():
        lines.append(
            f"| generate service, {key} (images/s) | {r['ddim50']['images_per_s']} "
            f"| {r['dpmpp']['images_per_s']} | {r['speedup']}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per in-process or classify measurement")
    parser.add_argument("--rounds", type=int, default=3, help="generate: measured waves per scenario")
    parser.add_argument("--fast-steps", type=int, default=10, help="DPM-Solver++ steps")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON file (default benchmarks/results/model_speed.json)"
    )
    parser.add_argument("--smoke", action="store_true", help="check the script: JSON under a temporary name")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "model_speed_smoke.json" if args.smoke else None
        args.out = args.out or ROOT / "benchmarks" / "results" / "model_speed.json"
    results: dict = {"in_process": {}, "generate_service": {}}
    for model in ("classifier", "autoencoder"):
        for batch in (1, 64):
            results["in_process"][f"{model} batch {batch}"] = r = in_process(model, batch, args.seconds)
            print(f"in-process {model} batch {batch}: {r}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        classify: dict = {"concurrency": args.concurrency}
        for precision in ("fp32", "int8"):
            with service("services.classify", Path(tmp), "--precision", precision, "--model-version", "1") as address:
                classify[precision] = classify_load(address, args.seconds, args.concurrency)
                # 64-image requests: the model's share of the call, and so INT8's, is at its largest.
                classify[f"{precision} 64x4"] = classify_load(address, args.seconds, 4, images=64)
            big = classify[f"{precision} 64x4"]
            print(f"classify service {precision}: {classify[precision]}, 64x4 {big}", flush=True)
        classify["speedup"] = round(classify["int8"]["requests_per_s"] / classify["fp32"]["requests_per_s"], 2)
        big_ratio = classify["int8 64x4"]["images_per_s"] / classify["fp32 64x4"]["images_per_s"]
        classify["speedup 64x4"] = round(big_ratio, 2)
        results["classify_service"] = classify
        with service("services.generate", Path(tmp), "--gan-model", "") as address:
            for concurrency in (1, args.concurrency):
                row = {
                    "ddim50": asyncio.run(
                        generate_load(address, generate_pb2.SAMPLER_DDIM, 50, concurrency, args.rounds)
                    ),
                    "dpmpp": asyncio.run(
                        generate_load(
                            address, generate_pb2.SAMPLER_DPM_SOLVER_PP, args.fast_steps, concurrency, args.rounds
                        )
                    ),
                }
                row["speedup"] = round(row["dpmpp"]["images_per_s"] / row["ddim50"]["images_per_s"], 2)
                key = f"{concurrency} caller{'s' if concurrency > 1 else ''}, DPM-Solver++ {args.fast_steps} steps"
                results["generate_service"][key] = row
                print(f"generate {key}: {row}", flush=True)
    results["setup"] = {
        "pinning": "servers on core 0 with 1 onnxruntime thread, clients on core 1",
        "seconds": args.seconds,
        "rounds": args.rounds,
        "command": " ".join(["python", "benchmarks/model_speed.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    # The table alone, for BENCHMARKS.md to include as it is.
    args.out.with_suffix(".md").write_text(
        f"{table}\n\n{results['setup']['pinning']}; `{results['setup']['command']}`\n"
    )
    print("\n" + table)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
