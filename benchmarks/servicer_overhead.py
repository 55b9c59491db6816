"""CPU per request of the serving path itself, without the transport: what nnserve adds to a call.

Each handler is called in a loop, in process, on one core, with the request bytes a client would
send; the figure is the process's CPU time per call (``time.process_time``), so a busy machine
disturbs it far less than a throughput figure. Rows:

- ``session.run``: onnxruntime alone on one image (the floor).
- ``naive``: the sixty-line server's ModelInfer (benchmarks/naive_server.py): parse, run, reply.
- ``nnserve OIP``: ModelInfer through nnserve's interceptor (request id, metrics, error mapping),
  data plane, validation and batcher (inline path), and reply.
- ``nnserve typed``: Classify the same way (top-k, probabilities, OOD score, labels).
- ``OIP w/o interceptor``: the OIP call with the servicer's handler called directly; ``..., batcher``:
  with the batcher's submit replaced by the model call too. The differences are what the
  interceptor and the batcher cost a call.

The transport (gRPC's own per-call cost, the same for every server) is what the end-to-end
benchmark (run.py) adds on top. ``--root DIR`` measures another checkout (an earlier build) in the
same run; the LeNet-size model is made the way run.py makes it.

    python benchmarks/servicer_overhead.py [--root DIR ...] [--calls 20000] [--out results/overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# Runs inside the measured checkout (its services/ on sys.path): prints one JSON object.
_MEASURE = r"""
import asyncio, json, sys, time
from pathlib import Path
root, repo, calls = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
sys.path[:0] = [str(root), str(root / "benchmarks")]
import numpy as np
from services.classify.__main__ import build
from services.classify.settings import ClassifySettings
from services.client import tensor_message
from services.core.interceptor import ServerInterceptor
from services.proto.inference import grpc_service_pb2 as pb
from services.proto.nnserve.v1 import classify_pb2
import naive_server


class Context:  # the parts of grpc.aio.ServicerContext the handlers touch
    def invocation_metadata(self): return ()
    def set_trailing_metadata(self, metadata): pass
    def trailing_metadata(self): return ()
    def time_remaining(self): return None
    def code(self): return None
    def peer(self): return "ipv4:127.0.0.1:1"
    async def abort(self, code, details="", *rest): raise RuntimeError(details)


class Collect:  # stands in for the server when servicers register their handlers
    def __init__(self): self.handlers = {}
    def add_generic_rpc_handlers(self, handlers):
        for h in handlers: self.handlers.update(h._method_handlers)
    def add_registered_method_handlers(self, service, handlers):
        for m, h in handlers.items(): self.handlers[f"/{service}/{m}"] = h


class Details:
    def __init__(self, method): self.method, self.invocation_metadata = method, ()


async def per_call(fn, n):
    for _ in range(min(500, n)): await fn()
    started = time.process_time()
    for _ in range(n): await fn()
    return (time.process_time() - started) / n * 1e6


async def main():
    fields = dict(model_repository=repo, model_version=1, intra_op_threads=1, workers=1, http_port=None,
                  metrics_port=None, model_poll_interval_s=0)
    if "robust_model" in ClassifySettings.model_fields:
        fields["robust_model"] = ""
    service = build(ClassifySettings(**fields))
    for slot in service.slots: slot.start()
    collect = Collect()
    for add, servicer, _ in service.servicers: add(servicer, collect)
    interceptor = ServerInterceptor(service.metrics)
    for _, servicer, _ in service.servicers:  # request parsers a servicer brings (as GrpcServer registers them)
        if hasattr(interceptor, "readers"):
            interceptor.readers.update(getattr(servicer, "request_readers", {}))
    async def continuation(details): return collect.handlers[details.method]
    infer = await interceptor.intercept_service(continuation, Details("/inference.GRPCInferenceService/ModelInfer"))
    classify = await interceptor.intercept_service(continuation, Details("/nnserve.v1.ClassifyService/Classify"))
    def requests(n):
        x = np.random.default_rng(0).random((n, 1, 28, 28), dtype=np.float32)
        request = pb.ModelInferRequest(model_name="classifier")
        request.inputs.add(name="image", datatype="FP32", shape=[n, 1, 28, 28])
        request.raw_input_contents.append(x.tobytes())
        pixels = (x[:, 0] * 255).astype(np.uint8)
        typed = classify_pb2.ClassifyRequest(tensor=tensor_message(pixels), top_k=5)
        return x, request.SerializeToString(), typed.SerializeToString()

    x, infer_bytes, classify_bytes = requests(1)
    x64, infer64, classify64 = requests(64)
    context = Context()
    naive = naive_server.Naive(str(repo / "classifier" / "1" / "model.onnx"))
    parse, reply = pb.ModelInferRequest.FromString, pb.ModelInferResponse.SerializeToString
    typed_reply = classify_pb2.ClassifyResponse.SerializeToString
    session = naive.session

    async def floor(): session.run(None, {"image": x})
    async def naive_call(): reply(await naive.ModelInfer(parse(infer_bytes), context))
    async def oip_call(): reply(await infer.unary_unary(infer_bytes, context))
    async def typed_call(): typed_reply(await classify.unary_unary(classify_bytes, context))
    async def floor64(): session.run(None, {"image": x64})
    async def naive64(): reply(await naive.ModelInfer(parse(infer64), context))
    async def oip64(): reply(await infer.unary_unary(infer64, context))
    async def typed64(): typed_reply(await classify.unary_unary(classify64, context))

    # Where the OIP call's cost goes: the same call with the interceptor left out (the servicer's
    # handler called directly), then with the batcher left out too (the model called at once).
    path = "/inference.GRPCInferenceService/ModelInfer"
    servicer_handler = collect.handlers[path].unary_unary
    read = getattr(interceptor, "readers", {}).get(path, parse)
    async def oip_servicer(): reply(await servicer_handler(read(infer_bytes), context))

    out = {}
    for name, fn, n in (("session.run", floor, calls), ("naive", naive_call, calls), ("nnserve OIP", oip_call, calls),
                        ("nnserve typed", typed_call, calls), ("session.run x64", floor64, calls // 10),
                        ("naive x64", naive64, calls // 10), ("nnserve OIP x64", oip64, calls // 10),
                        ("nnserve typed x64", typed64, calls // 10),
                        ("OIP w/o interceptor", oip_servicer, calls)):
        out[name] = round(await per_call(fn, n), 1)
    for slot in service.slots:
        batcher = slot.current.batcher if hasattr(slot, "current") else None
        if batcher is None or not hasattr(batcher, "_predict"):
            break
        async def submit(inputs, deadline=None, predict=batcher._predict): return predict(inputs)
        batcher.submit = submit
    else:
        out["OIP w/o interceptor, batcher"] = round(await per_call(oip_servicer, calls), 1)
    print(json.dumps(out))

asyncio.run(main())
"""


def measure(root: Path, repository: Path, calls: int) -> dict[str, float]:
    """Per-call CPU microseconds of each row, measured in ``root``'s code on core 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    command = ["taskset", "-c", "0", PY, "-c", _MEASURE, str(root), str(repository), str(calls)]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, action="append", default=[], help="another checkout to measure too")
    parser.add_argument("--calls", type=int, default=20000, help="calls per row (default 20000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, alternating the checkouts; the best is kept")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    from lenet import make_lenet
    from run import describe_checkout

    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "lenet"
        make_lenet(repository)
        roots = [ROOT, *[r.resolve() for r in args.root]]
        best: dict[str, dict[str, float]] = {}
        for round_ in range(args.rounds):
            for root in roots:
                rows = measure(root, repository, args.calls)
                kept = best.setdefault(str(root), rows)
                for key, value in rows.items():
                    kept[key] = min(kept[key], value)
                print(f"round {round_ + 1} {root}: {rows}", flush=True)
    header = f"{'checkout':<40} " + " ".join(f"{k:>14}" for k in next(iter(best.values())))
    print(header)
    for root, rows in best.items():
        print(f"{root:<40} " + " ".join(f"{v:>11.1f} us" for v in rows.values()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {"calls": args.calls, "commits": {r: describe_checkout(Path(r)) for r in best}, "us_per_call": best},
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
