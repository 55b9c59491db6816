"""``nnserve loadtest``: closed- or open-loop gRPC load against an nnserve service.

    nnserve loadtest 127.0.0.1:50051 --concurrency 16 --duration 10
    nnserve loadtest 127.0.0.1:50051 --images-per-request 64 --concurrency 4 --json out.json
    nnserve loadtest 127.0.0.1:50051 --rate 2000 --arrivals poisson --duration 10
    nnserve loadtest 127.0.0.1:50053 --rpc generate-stream --model diffusion --steps 50 -c 16
    nnserve loadtest 127.0.0.1:50051 --rpc infer --model-name classifier -n 8

Closed loop: N callers, each sends its next request when the last one returns. Open loop: requests
start at a fixed rate (constant or Poisson arrivals) whatever the server does, and latency counts
from the *intended* start, so a server that falls behind cannot hide its queueing (no coordinated
omission). Latencies go into a log-bucketed histogram (1% resolution); the report gives requests/s,
images/s, p50/p90/p99/p99.9/max and errors by status code, as a table or JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from services.cliargs import EXIT_STATUS, HelpFormatter, bounded
from services.client import channel_options, tensor_message
from services.connect import ConnectionOptionError, add_connection_arguments, aio_channel, check_connection_arguments
from services.core.eventloop import loop_factory
from services.proto.inference import grpc_service_pb2 as oip_pb
from services.proto.inference import grpc_service_pb2_grpc as oip_grpc
from services.proto.nnserve.v1 import (
    classify_pb2,
    classify_pb2_grpc,
    generate_pb2_grpc,
    restore_pb2,
    restore_pb2_grpc,
)


class Histogram:
    """Latency histogram with logarithmic buckets: relative error under 1% from 1 us to 1000 s."""

    BASE = 1.01
    MIN = 1e-6

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.max = 0.0
        self.total = 0

    def record(self, seconds: float) -> None:
        self.counts[max(0, int(math.log(max(seconds, self.MIN) / self.MIN, self.BASE)))] += 1
        self.max = max(self.max, seconds)
        self.total += 1

    def merge(self, other: Histogram) -> None:
        self.counts.update(other.counts)
        self.max = max(self.max, other.max)
        self.total += other.total

    def quantile(self, q: float) -> float:
        if not self.total:
            return float("nan")
        rank, seen = q * self.total, 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                # the bucket's geometric midpoint, capped by the true maximum
                return min(self.MIN * self.BASE ** (bucket + 0.5), self.max)
        return self.max

    def to_state(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "max": self.max, "total": self.total}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Histogram:
        h = cls()
        h.counts = Counter({int(k): v for k, v in state["counts"].items()})
        h.max, h.total = state["max"], state["total"]
        return h


@dataclass
class Result:
    """What one load run measured."""

    histogram: Histogram = field(default_factory=Histogram)
    errors: Histogram = field(default_factory=Histogram)  # latency of failed calls
    codes: Counter[str] = field(default_factory=Counter)
    images: int = 0
    seconds: float = 0.0

    def merge(self, other: Result) -> None:
        self.histogram.merge(other.histogram)
        self.errors.merge(other.errors)
        self.codes.update(other.codes)
        self.images += other.images
        self.seconds = max(self.seconds, other.seconds)

    def report(self, config: dict[str, Any]) -> dict[str, Any]:
        ok = self.codes.get("OK", 0)
        h = self.histogram
        return {
            "config": config,
            "seconds": round(self.seconds, 3),
            "requests": sum(self.codes.values()),
            "ok": ok,
            "requests_per_s": round(ok / self.seconds, 1) if self.seconds else 0.0,
            "images_per_s": round(self.images / self.seconds, 1) if self.seconds else 0.0,
            "latency_ms": {
                name: round(h.quantile(q) * 1000, 3)
                for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))
            }
            | {"max": round(h.max * 1000, 3)},
            "errors": {k: v for k, v in self.codes.items() if k != "OK"},
            "error_latency_ms": {
                "p50": round(self.errors.quantile(0.5) * 1000, 3),
                "p99": round(self.errors.quantile(0.99) * 1000, 3),
                "max": round(self.errors.max * 1000, 3),
            }
            if self.errors.total
            else {},
        }


def image_batch(args: argparse.Namespace) -> np.ndarray:
    """uint8 [n, 28, 28]: the sample images (cycled) or random pixels."""
    n = args.images_per_request
    if args.payload == "samples":
        from services.core.images import decode_images

        files = sorted(Path(args.samples_dir).glob("*.png"))
        if not files:
            raise SystemExit(f"no PNG files in {args.samples_dir}")
        pixels = decode_images([f.read_bytes() for f in files])
        return (pixels[np.arange(n) % len(pixels)] * 255).round().astype(np.uint8)
    return np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def build_request(args: argparse.Namespace) -> classify_pb2.ClassifyRequest:
    """The Classify payload: sample images, random pixels, or files given on the command line."""
    n = args.images_per_request
    if args.payload == "files":
        images = [Path(p).read_bytes() for p in args.files]
        return classify_pb2.ClassifyRequest(images=(images * n)[:n] if n else images, top_k=1)
    return classify_pb2.ClassifyRequest(tensor=tensor_message(image_batch(args)), top_k=1)


Caller = Callable[[], Awaitable[object]]


async def make_caller(args: argparse.Namespace, channel: grpc.aio.Channel) -> tuple[Caller, int]:
    """An async function making one call of the chosen RPC, and the images each call carries."""
    timeout = args.timeout
    if args.rpc == "classify":
        request = build_request(args)
        stub = classify_pb2_grpc.ClassifyServiceStub(channel)
        count = len(request.images) if args.payload == "files" else args.images_per_request
        return (lambda: stub.Classify(request, timeout=timeout)), count
    if args.rpc == "restore":
        restore_request = restore_pb2.RestoreRequest(tensor=tensor_message(image_batch(args)))
        restore_stub = restore_pb2_grpc.RestoreServiceStub(channel)
        return (lambda: restore_stub.Restore(restore_request, timeout=timeout)), args.images_per_request
    if args.rpc in ("generate", "generate-stream"):
        from services.client import GenerateClient

        gen_request = GenerateClient.request(
            model=args.model, count=args.images_per_request, steps=args.steps, seed=0, output="tensor"
        )
        gen_stub = generate_pb2_grpc.GenerateServiceStub(channel)
        if args.rpc == "generate":
            return (lambda: gen_stub.Generate(gen_request, timeout=timeout)), args.images_per_request

        async def stream() -> None:
            async for _ in gen_stub.GenerateStream(gen_request, timeout=timeout):
                pass

        return stream, args.images_per_request
    # OIP ModelInfer on any model: random inputs shaped from the model's own metadata.
    oip = oip_grpc.GRPCInferenceServiceStub(channel)
    try:
        meta = await oip.ModelMetadata(oip_pb.ModelMetadataRequest(name=args.model_name), timeout=timeout)
        specs = [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        specs = []
    if not specs:  # some servers publish no input metadata: use --input NAME:DATATYPE:DIMS
        name, datatype, dims = args.input.split(":")
        specs = [(name, datatype, [-1, *(int(d) for d in dims.split("x"))])]
    rng = np.random.default_rng(0)
    infer = oip_pb.ModelInferRequest(model_name=args.model_name)
    for name, datatype, dims_ in specs:
        shape = [args.images_per_request if i == 0 else max(d, 1) for i, d in enumerate(dims_)]
        if datatype == "FP32":
            data = rng.random(shape, dtype=np.float32).astype("<f4").tobytes()
        elif datatype == "INT64":
            data = rng.integers(0, 10, size=shape).astype("<i8").tobytes()
        else:
            raise SystemExit(f"loadtest: input {name} has datatype {datatype}, not supported here")
        infer.inputs.add(name=name, datatype=datatype, shape=shape)
        infer.raw_input_contents.append(data)
    return (lambda: oip.ModelInfer(infer, timeout=timeout)), args.images_per_request


async def _run(args: argparse.Namespace, concurrency: int, rate: float, seed: int) -> Result:
    # Each channel its own connection (gRPC would otherwise share one among them), so a server
    # with several workers on one port (SO_REUSEPORT spreads connections) sees them all.
    options = [*channel_options(round_robin=args.round_robin), ("grpc.use_local_subchannel_pool", 1)]
    channels = [aio_channel(args.target, args, options) for _ in range(args.channels)]
    made = [await make_caller(args, c) for c in channels]
    stubs = [caller for caller, _ in made]
    images = made[0][1]
    result = Result()
    loop = asyncio.get_running_loop()
    # Times come from perf_counter, not loop.time(): uvloop's clock counts whole milliseconds, read
    # once per loop iteration, which would round every latency.
    clock = time.perf_counter
    measure_from = clock() + args.warmup
    stop_at = measure_from + args.duration
    budget = [args.requests or -1]

    async def call(stub: Any, intended: float) -> None:
        try:
            await stub()
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        done = clock()
        if intended >= measure_from and done <= stop_at + args.timeout:
            result.codes[code] += 1
            if code == "OK":
                result.histogram.record(done - intended)
                result.images += images
            else:
                result.errors.record(done - intended)

    def more() -> bool:
        if clock() >= stop_at or budget[0] == 0:
            return False
        if budget[0] > 0 and clock() >= measure_from:
            budget[0] -= 1
        return True

    async def closed_caller(i: int) -> None:
        stub = stubs[i % len(stubs)]
        while more():
            await call(stub, clock())

    async def open_loop() -> None:
        rng = random.Random(seed)
        pending: set[asyncio.Task[None]] = set()
        next_at, i = clock(), 0
        while more():
            delay = next_at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(call(stubs[i % len(stubs)], next_at))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
            next_at += rng.expovariate(rate) if args.arrivals == "poisson" else 1.0 / rate
        if pending:
            await asyncio.wait(pending)

    progress = loop.create_task(_progress(result, measure_from, stop_at, args.quiet))
    started = clock()
    if rate > 0:
        await open_loop()
    else:
        await asyncio.gather(*(closed_caller(i) for i in range(concurrency)))
    result.seconds = min(clock(), stop_at) - max(measure_from, started)
    progress.cancel()
    for c in channels:
        await c.close()
    return result


async def _progress(result: Result, measure_from: float, stop_at: float, quiet: bool) -> None:
    if quiet or not sys.stderr.isatty():  # live lines are for a person watching, not for a log
        return
    while True:
        await asyncio.sleep(1.0)
        now = time.perf_counter()
        if now < measure_from:
            print(f"  warming up ({measure_from - now:.0f}s left)", file=sys.stderr, flush=True)
            continue
        elapsed = now - measure_from
        ok = result.codes.get("OK", 0)
        print(
            f"  {min(elapsed, stop_at - measure_from):5.1f}s  {ok / max(elapsed, 1e-9):9.1f} req/s  "
            f"p99 {result.histogram.quantile(0.99) * 1000:7.2f} ms  errors {sum(result.codes.values()) - ok}",
            file=sys.stderr,
            flush=True,
        )


def _worker(args: argparse.Namespace, concurrency: int, rate: float, seed: int) -> dict[str, Any]:
    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:  # uvloop when installed: a faster client
        r = runner.run(_run(args, concurrency, rate, seed))
    return {
        "histogram": r.histogram.to_state(),
        "errors": r.errors.to_state(),
        "codes": dict(r.codes),
        "images": r.images,
        "seconds": r.seconds,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the load described by ``args`` (possibly in several processes) and return the report."""
    processes = max(1, args.processes)
    shares = [args.concurrency // processes + (1 if i < args.concurrency % processes else 0) for i in range(processes)]
    rate = args.rate / processes if args.rate else 0.0
    if processes == 1:
        parts = [_worker(args, shares[0], rate, 0)]
    else:
        args.quiet = True
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            parts = pool.starmap(_worker, [(args, shares[i], rate, i) for i in range(processes)])
    total = Result()
    for part in parts:
        total.merge(
            Result(
                Histogram.from_state(part["histogram"]),
                Histogram.from_state(part["errors"]),
                Counter(part["codes"]),
                part["images"],
                part["seconds"],
            )
        )
    config = {
        "target": args.target,
        "rpc": args.rpc,
        "mode": "open" if args.rate else "closed",
        "concurrency": args.concurrency,
        "rate": args.rate,
        "arrivals": args.arrivals if args.rate else None,
        "images_per_request": args.images_per_request,
        "payload": args.payload,
        "channels": args.channels,
        "processes": processes,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
    }
    return total.report(config)


def format_table(report: dict[str, Any]) -> str:
    c, lat = report["config"], report["latency_ms"]
    load = f"rate {c['rate']}/s ({c['arrivals']})" if c["mode"] == "open" else f"concurrency {c['concurrency']}"
    header = (
        f"{c['rpc']} on {c['target']}: {c['mode']} loop, {load}, "
        f"{c['images_per_request']} image(s) per request, {report['seconds']:.1f}s measured"
    )
    lines = [
        header,
        f"  requests/s {report['requests_per_s']:>10.1f}    images/s {report['images_per_s']:>10.1f}"
        f"    ok {report['ok']}",
        "  latency ms " + "  ".join(f"{k} {v:.2f}" for k, v in lat.items()),
        f"  errors     {report['errors'] or 'none'}",
    ]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    positive_int, positive = bounded(int, 1), bounded(float, 0.001)
    p.add_argument("target", help="host:port of an nnserve service")
    p.add_argument(
        "--rpc",
        choices=["classify", "restore", "generate", "generate-stream", "infer"],
        default="classify",
        help="which RPC to load: the typed APIs, or OIP ModelInfer (infer) on --model-name",
    )
    p.add_argument("--model", choices=["gan", "diffusion"], default="gan", help="generate: which generator")
    p.add_argument("--steps", type=positive_int, default=10, help="generate: diffusion steps")
    p.add_argument("--model-name", default="classifier", help="infer: the model to call")
    p.add_argument(
        "--input", default="image:FP32:1x28x28", help="infer: NAME:DATATYPE:DIMS when the server publishes no metadata"
    )
    p.add_argument("--concurrency", "-c", type=positive_int, default=16, help="closed loop: callers")
    p.add_argument(
        "--rate", type=bounded(float, 0.0), default=0.0, help="open loop: requests per second (0: closed loop)"
    )
    p.add_argument("--arrivals", choices=["constant", "poisson"], default="poisson", help="open loop: arrival process")
    p.add_argument("--duration", type=positive, default=10.0, help="seconds measured, after the warm-up")
    p.add_argument("--warmup", type=bounded(float, 0.0), default=2.0, help="seconds of load not measured, first")
    p.add_argument(
        "--requests", type=bounded(int, 0), default=0, help="stop after this many measured requests (0: no limit)"
    )
    p.add_argument("--images-per-request", "-n", type=positive_int, default=1, help="images (or samples) per call")
    p.add_argument(
        "--payload",
        choices=["random", "samples", "files"],
        default="random",
        help="random pixels, the PNGs in --samples-dir, or --files",
    )
    p.add_argument("--samples-dir", default="examples/images", help="--payload samples: where the PNGs are")
    p.add_argument("--files", nargs="*", default=[], help="--payload files: the image files to send (default: none)")
    p.add_argument("--channels", type=positive_int, default=4, help="gRPC channels (connections) per process")
    p.add_argument(
        "--round-robin",
        action="store_true",
        help="spread calls over every address the target resolves to, dns:///host:port for replicas (default: off)",
    )
    p.add_argument(
        "--processes", type=positive_int, default=1, help="client processes, so the client is not the bottleneck"
    )
    p.add_argument("--timeout", type=positive, default=30.0, help="seconds before one call gives up")
    p.add_argument("--json", type=Path, default=None, help="also write the report here (default: table only)")
    p.add_argument(
        "--quiet", action="store_true", help="no live progress (default: a line a second, when stderr is a terminal)"
    )
    add_connection_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    """The ``nnserve loadtest`` parser (every option's help ends with its default)."""
    p = argparse.ArgumentParser(
        prog="nnserve loadtest", description=__doc__, formatter_class=HelpFormatter, epilog=EXIT_STATUS
    )
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        if args.payload == "files":
            for path in args.files:
                Path(path).read_bytes()  # fail here, in one line, not in every worker
            if not args.files:
                p.error("--payload files needs --files")
        check_connection_arguments(args)  # unreadable TLS or token files: one line here, not a traceback later
        report = run(args)
        print(format_table(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    except ConnectionOptionError as exc:
        print(f"nnserve loadtest: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nnnserve loadtest: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"nnserve loadtest: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
