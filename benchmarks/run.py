"""The classify benchmark suite: nnserve beside the transport floor, in-process onnxruntime and peers.

    python benchmarks/run.py                 # everything, about 6 minutes; writes BENCHMARKS.md
    python benchmarks/run.py --seconds 2     # shorter runs
    python benchmarks/run.py --only overhead # the serving-overhead and workers sections alone
                                             # (about 4 minutes), the rest kept from the last run

Every server runs pinned to core 0 with one onnxruntime thread; the load generator
(`nnserve loadtest`, one process) is pinned to core 1. Servers, all serving models/classifier/1:

- echo: a bare grpc.aio server answering the same messages without a model (the transport floor)
- nnserve: the classify service (typed API and OIP ModelInfer), dynamic batching on, and off
- mlserver, kserve: Seldon MLServer and KServe's ModelServer with a small onnxruntime runtime each
  (benchmarks/peers/), adaptive batching on for MLServer, in their own venvs (make bench-venvs)

Results go to benchmarks/results/classify.json, plots to benchmarks/results/*.png, and the tables
to BENCHMARKS.md (the generation section comes from benchmarks/generate_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from services.processes import launch, wait_until_serving  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PY = str(ROOT / ".venv" / "bin" / "python")
MODEL = ROOT / "models" / "classifier" / "1" / "model.onnx"
# A checkout of an earlier commit (git worktree add DIR REV) whose classify service joins the overhead
# table as "nnserve-before", so before/after come from one run.
BEFORE = Path(os.environ["NNSERVE_BENCH_BEFORE"]) if os.environ.get("NNSERVE_BENCH_BEFORE") else None


def describe_checkout(path: Path) -> str:
    """'b3cd2f7 (2026-12-05)': the commit a checkout is at, so a table names the build it measured."""
    done = subprocess.run(["git", "-C", str(path), "log", "-1", "--format=%h (%cs)"], capture_output=True, text=True)
    return done.stdout.strip() or path.name


def describe_cpu() -> str:
    """'AMD EPYC, 2 cores, AVX2 (no AVX-512)': what the figures were measured on; machines of one
    kind have differed by 3x in per-call cost, so a table names its CPU."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    vector = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-512" if "avx512f" in flags else "AVX2 (no AVX-512)"
    if "avx2" not in flags and "avx512f" not in flags:
        vector = "no AVX2"
    return f"{names[0] if names else 'unknown CPU'}, {os.cpu_count()} cores, {vector}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(address: str, timeout: float = 90.0) -> None:
    import grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with grpc.insecure_channel(address) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=1)
                return
            except grpc.FutureTimeoutError:
                pass
        time.sleep(0.2)
    raise RuntimeError(f"{address} did not come up")


@contextmanager
def server(
    name: str, workdir: Path, repository: Path = ROOT / "models", workers: int = 1, pin: bool = True
) -> Iterator[str]:
    """Start one server pinned to core 0 on ``repository``'s classifier; yields its gRPC address.

    Names: echo, naive (benchmarks/naive_server.py), nnserve (classify), nnserve-nobatch (classify,
    batching off), nnserve-restore, kserve, mlserver.
    """
    model = repository / "classifier" / "1" / "model.onnx"
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    pinning = ["taskset", "-c", "0"] if pin else []
    if name == "nnserve-before":  # an earlier checkout's classify service (NNSERVE_BENCH_BEFORE=DIR)
        assert BEFORE is not None
        port = free_port()
        command = [PY, "-m", "services.classify", "--port", str(port), "--metrics-port", "none"]
        command += ["--intra-op-threads", "1", "--max-queue-size", "4096", "--model-poll-interval-s", "0"]
        if repository == ROOT / "models":
            repository = BEFORE / "models"  # the models as they were then (manifests it can read)
        else:  # a repository made now: keep only the manifest keys the earlier schema knew
            copy = workdir / "before-repository"
            shutil.copytree(repository, copy, dirs_exist_ok=True)
            for path in copy.glob("*/*/manifest.json"):
                manifest = json.loads(path.read_text())
                manifest.pop("precision", None)
                path.write_text(json.dumps(manifest))
            repository = copy
        command += ["--model-repository", str(repository), "--model-version", "1"]
        with open(workdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen([*pinning, *command], cwd=BEFORE, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_ready(f"127.0.0.1:{port}")
                time.sleep(0.2)
                yield f"127.0.0.1:{port}"
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        return
    if name.startswith("nnserve"):  # started, and known to serve, the way nnserve up and the tests do it
        service = "restore" if name == "nnserve-restore" else "classify"
        flags = [
            *("--port", "0", "--metrics-port", "none", "--http-port", "none", "--intra-op-threads", "1"),
            *("--max-queue-size", "4096", "--model-poll-interval-s", "0", "--model-repository", str(repository)),
            # Version 1: the file the naive server and the peers load too.
            *("--model-version", "1"),
            *("--workers", str(workers)),
            *(["--batching", "false"] if name == "nnserve-nobatch" else []),
        ]
        with open(workdir / f"{name}.log", "wb") as log:
            launched = launch(
                f"services.{service}", flags, workdir / f"{name}.json", prefix=pinning, env=env, output=log
            )
            try:
                wait_until_serving([launched], 120)
                time.sleep(0.2)
                yield f"127.0.0.1:{launched.info['port']}"
            finally:
                launched.stop(timeout=30)
        return
    port = free_port()
    cwd = ROOT
    if name == "echo":
        command = [PY, "benchmarks/echo_server.py", "--port", str(port)]
    elif name == "naive":
        command = [PY, "benchmarks/naive_server.py", "--model", str(model), "--port", str(port)]
    elif name == "kserve":
        command = [
            str(ROOT / ".venv-kserve/bin/python"),
            "benchmarks/peers/kserve_server.py",
            "--model",
            str(model),
            "--grpc-port",
            str(port),
            "--http-port",
            str(free_port()),
        ]
    elif name == "mlserver":
        command, cwd = mlserver_folder(workdir, model, port, free_port())
        env["PYTHONPATH"] = str(cwd)
    else:
        raise ValueError(name)
    log = open(workdir / f"{name}.log", "wb")
    proc = subprocess.Popen([*pinning, *command], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"127.0.0.1:{port}")
        time.sleep(1.0 if name in ("mlserver", "kserve") else 0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def mlserver_folder(workdir: Path, model: Path, grpc_port: int, http_port: int) -> tuple[list[str], Path]:
    """An MLServer model folder serving ``model`` with the peers' onnxruntime runtime; (command, folder).

    The folder must be on PYTHONPATH (the runtime is imported from it)."""
    folder = workdir / "mlserver"
    folder.mkdir(exist_ok=True)
    shutil.copy(ROOT / "benchmarks/peers/mlserver/onnx_runtime.py", folder)
    settings = {"grpc_port": grpc_port, "http_port": http_port, "metrics_port": free_port(), "parallel_workers": 0}
    config = {
        "name": "classifier",
        "implementation": "onnx_runtime.OnnxClassifier",
        "parameters": {"uri": str(model)},
        "max_batch_size": 64,
        "max_batch_time": 0.002,
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    (folder / "model-settings.json").write_text(json.dumps(config))
    return [str(ROOT / ".venv-mlserver/bin/mlserver"), "start", str(folder)], folder


def load(address: str, rpc: str, seconds: float, *args: str, pin: bool = True) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [
            *(["taskset", "-c", "1"] if pin else []),
            PY,
            "-m",
            "services.loadtest",
            address,
            "--rpc",
            rpc,
            "--model-name",
            "classifier",
            "--duration",
            str(seconds),
            "--warmup",
            "1",
            "--quiet",
            "--json",
            out.name,
            *args,
        ]
        subprocess.run(command, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


MODELS = {
    "classifier": {"image": ("float32", [1, 28, 28])},
    "autoencoder": {"image": ("float32", [1, 28, 28]), "mask": ("float32", [1, 28, 28])},
    "gan_generator": {"z": ("float32", [64]), "label": ("int64", [])},
    "diffusion_denoiser": {"x_t": ("float32", [1, 28, 28]), "t": ("int64", []), "label": ("int64", [])},
}


def in_process(batch: int, seconds: float, model: str = "classifier") -> float:
    """Rows/s of in-process onnxruntime (one thread, core 0) on ``model`` at ``batch``."""
    inputs = {name: (dtype, [batch, *dims]) for name, (dtype, dims) in MODELS[model].items()}
    code = f"""
import time, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 1
o.add_session_config_entry("session.intra_op.allow_spinning", "0")
s = ort.InferenceSession({str(ROOT / "models" / model / "1" / "model.onnx")!r}, o, providers=["CPUExecutionProvider"])
feed = {{k: (np.random.rand(*shape) * 10).astype(dtype) for k, (dtype, shape) in {inputs!r}.items()}}
for _ in range(10): s.run(None, feed)
n, t = 0, time.perf_counter()
while time.perf_counter() - t < {seconds}: s.run(None, feed); n += 1
print(n * {batch} / (time.perf_counter() - t))
"""
    result = subprocess.run(["taskset", "-c", "0", PY, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip())


def in_process_model(path: Path, batch: int, seconds: float) -> float:
    """Images/s of in-process onnxruntime (one thread, core 0) on the classifier at ``path``."""
    code = f"""
import time, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 1
o.add_session_config_entry("session.intra_op.allow_spinning", "0")
s = ort.InferenceSession({str(path)!r}, o, providers=["CPUExecutionProvider"])
feed = {{"image": np.random.rand({batch}, 1, 28, 28).astype(np.float32)}}
for _ in range(10): s.run(None, feed)
n, t = 0, time.perf_counter()
while time.perf_counter() - t < {seconds}: s.run(None, feed); n += 1
print(n * {batch} / (time.perf_counter() - t))
"""
    result = subprocess.run(["taskset", "-c", "0", PY, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip())


def overhead(seconds: float, peers: list[str], tmp: Path, rounds: int = 1) -> dict:
    """Serving overhead: every server on the shipped classifier and on a LeNet-size one, OIP and typed.

    For 64-image requests the one-core limit is 1 / (1/echo req/s + 64/in-process images/s): the
    transport's cost and the model's, paid in turn on the one core the server has. With ``rounds``
    above 1 every server is measured that many times, the rounds interleaved (all servers once,
    then again), and each cell is the median run: slow drift of a shared machine then hits every
    server alike instead of whichever ran during it.
    """
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from lenet import make_lenet

    make_lenet(tmp / "lenet")
    repositories = {"classifier (468k params)": ROOT / "models", "lenet (62k params)": tmp / "lenet"}
    out: dict = {"echo": {}, "models": {}, "cpu": describe_cpu()}
    if BEFORE is not None:
        out["before"] = describe_checkout(BEFORE)
    with server("echo", tmp) as address:
        for rpc in ("classify", "infer"):
            runs = {str(c): load(address, rpc, seconds, "-c", str(c)) for c in (1, 16)}
            runs["64x4"] = load(address, rpc, seconds, "-c", "4", "-n", "64")
            out["echo"][rpc] = runs
            print(f"echo {rpc}: {[round(r['requests_per_s']) for r in runs.values()]} req/s", flush=True)
    for label, repository in repositories.items():
        path = repository / "classifier" / "1" / "model.onnx"
        ip = {str(b): round(in_process_model(path, b, min(seconds, 2.0)), 1) for b in (1, 64)}
        measured: dict[str, dict[str, list[dict]]] = {}
        plan = [("naive", "infer"), ("nnserve", "classify"), ("nnserve", "infer"), *[(p, "infer") for p in peers]]
        if BEFORE is not None:  # the same server as of an earlier commit, for before/after in one run
            plan[3:3] = [("nnserve-before", "classify"), ("nnserve-before", "infer")]
        for round_ in range(1, rounds + 1):
            for name in dict.fromkeys(n for n, _ in plan):
                with server(name, tmp, repository) as address:
                    for rpc in [r for n, r in plan if n == name]:
                        runs = {str(c): load(address, rpc, seconds, "-c", str(c)) for c in (1, 16)}
                        runs["64x4"] = load(address, rpc, seconds, "-c", "4", "-n", "64")
                        for key, run in runs.items():
                            measured.setdefault(f"{name} {rpc}", {}).setdefault(key, []).append(run)
                        print(
                            f"{label} round {round_}/{rounds} {name} {rpc}: c=1 {runs['1']['requests_per_s']:.0f} req/s, "
                            f"c=16 {runs['16']['requests_per_s']:.0f} req/s, 64x4 {runs['64x4']['images_per_s']:.0f} images/s",
                            flush=True,
                        )
        rows = {row: {key: median_run(runs) for key, runs in cells.items()} for row, cells in measured.items()}
        out["models"][label] = {"in_process_images_per_s": ip, "servers": rows}
    return out


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (the lower middle one of an even count), with every
    round's figure kept beside it."""
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "rounds_images_per_s": [round(r["images_per_s"], 1) for r in runs]}


def scaling(seconds: float, tmp: Path) -> dict:
    """nnserve classify with 1 and 2 workers, neither server nor client pinned (both share 2 cores)."""
    out: dict = {}
    for workers in (1, 2):
        with server("nnserve", tmp, workers=workers, pin=False) as address:
            for rpc in ("classify", "infer"):
                for c in (16, 64):
                    r = load(address, rpc, seconds, "-c", str(c), "--channels", "8", pin=False)
                    out.setdefault(f"{rpc} c={c}", {})[str(workers)] = r
                    print(f"workers={workers} {rpc} c={c}: {r['requests_per_s']:.0f} req/s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument(
        "--rounds", type=int, default=1, help="overhead section: measure every server this many times, interleaved"
    )
    parser.add_argument(
        "--only",
        choices=["overhead"],
        default=None,
        help="run only the serving-overhead and workers sections; the others stay as the last full run left them",
    )
    args = parser.parse_args(argv)
    peers = [p for p in ("mlserver", "kserve") if (ROOT / f".venv-{p}").exists()]
    if args.only == "overhead":
        results = json.loads((RESULTS / "classify.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            results["overhead"] = overhead(args.seconds, peers, Path(tmp), args.rounds)
            results["scaling"] = scaling(args.seconds, Path(tmp))
        (RESULTS / "classify.json").write_text(json.dumps(results, indent=2) + "\n")
        write_markdown(results)
        return 0
    results: dict = {
        "seconds_per_run": args.seconds,
        "pinning": "server on core 0 (1 onnxruntime thread), client on core 1",
    }
    with tempfile.TemporaryDirectory() as tmp:
        results["overhead"] = overhead(args.seconds, peers, Path(tmp), args.rounds)
        results["scaling"] = scaling(args.seconds, Path(tmp))
    results["in_process_images_per_s"] = {str(b): round(in_process(b, args.seconds), 1) for b in (1, 16, 64)}
    results["in_process_rows_per_s"] = {
        model: {str(b): round(in_process(b, min(args.seconds, 2.0), model), 1) for b in (1, 64)} for model in MODELS
    }
    print("in-process onnxruntime:", results["in_process_rows_per_s"], flush=True)
    plan = {"echo": ["classify", "infer"], "nnserve": ["classify", "infer"], "nnserve-nobatch": ["classify"]}
    plan.update({p: ["infer"] for p in peers})
    closed: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, rpcs in plan.items():
            with server(name, Path(tmp)) as address:
                for rpc in rpcs:
                    key = f"{name} {rpc}"
                    for c in (1, 16, 64):
                        r = load(address, rpc, args.seconds, "-c", str(c))
                        closed.setdefault(key, {})[str(c)] = r
                        print(
                            f"{key:<24} c={c:<3} {r['requests_per_s']:>9.1f} req/s  p99 {r['latency_ms']['p99']:>8.2f} ms  errors {r['errors']}",
                            flush=True,
                        )
                    if name != "echo" and name != "nnserve-nobatch":
                        r = load(address, rpc, args.seconds, "-c", "4", "-n", "64")
                        closed[key]["64x4"] = r
                        print(f"{key:<24} 64-image c=4 {r['images_per_s']:>9.1f} images/s", flush=True)
                if name in ("nnserve", *peers):
                    rpc = "classify" if name == "nnserve" else "infer"
                    capacity = closed[f"{name} {rpc}"]["64"]["requests_per_s"]
                    sweep = []
                    for fraction in (0.25, 0.5, 0.75, 0.9, 1.0, 1.1):
                        r = load(address, rpc, args.seconds, "--rate", str(round(capacity * fraction, 1)))
                        sweep.append(
                            {
                                "offered": round(capacity * fraction, 1),
                                **{k: r[k] for k in ("requests_per_s", "latency_ms", "errors")},
                            }
                        )
                        print(
                            f"{name:<24} rate {capacity * fraction:>8.1f}/s  p99 {r['latency_ms']['p99']:>8.2f} ms",
                            flush=True,
                        )
                    results.setdefault("open_loop", {})[f"{name} {rpc}"] = sweep
        with server("nnserve-restore", Path(tmp)) as address:
            for label, extra in (("restore c=16", ["-c", "16"]), ("restore 64-image c=4", ["-c", "4", "-n", "64"])):
                r = load(address, "restore", args.seconds, *extra)
                results.setdefault("restore", {})[label] = r
                print(
                    f"{label:<24} {r['images_per_s']:>9.1f} images/s  p99 {r['latency_ms']['p99']:>8.2f} ms", flush=True
                )
    results["closed_loop"] = closed
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "classify.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results)
    write_markdown(results)
    return 0


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, runs in results["closed_loop"].items():
        xs = [int(c) for c in runs if c.isdigit()]
        ax.plot(xs, [runs[str(c)]["requests_per_s"] for c in xs], marker="o", label=key)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent callers (single-image requests)")
    ax.set_ylabel("requests/s")
    ax.set_title("Classify throughput vs concurrency (server on 1 core)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput_vs_concurrency.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, sweep in results.get("open_loop", {}).items():
        ax.plot([s["offered"] for s in sweep], [s["latency_ms"]["p99"] for s in sweep], marker="o", label=key)
    ax.axhline(50, color="gray", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s, Poisson arrivals)")
    ax.set_ylabel("p99 latency (ms, from intended send time)")
    ax.set_title("p99 vs offered load")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "p99_vs_offered_load.png")
    plt.close(fig)


def overhead_markdown(o: dict) -> str:
    """The serving-overhead tables: every server against the naive inline one, and the x-limit."""
    parts = [
        "## Serving overhead: nnserve against the naive inline server (`benchmarks/naive_server.py`)\n",
        "Single-image requests: requests/s (p50 ms at 1 caller, p99 ms at 16) and the ratio to the naive "
        "server's requests/s; 64-image requests at 4 callers: images/s and **x limit** = images/s / "
        "(1 / (1/echo req/s + 64/in-process images/s)), the one-core bound. nnserve runs with batching, "
        "validation, metrics and limits on (its defaults).\n",
    ]
    if "cpu" in o:
        parts.append(f"Measured on: {o['cpu']}.\n")
    first = next(iter(next(iter(o["models"].values()))["servers"].values()))["1"]
    rounds = len(first.get("rounds_images_per_s", [None]))
    if rounds > 1:
        parts.append(
            f"Each cell is the median of {rounds} rounds, interleaved (every server once, then again), "
            "so that a shared machine's drift hits every server alike; every round's figure is in "
            "`benchmarks/results/classify.json`.\n"
        )
    if "before" in o:
        parts.append(
            f"`nnserve-before` is the same server at commit {o['before']}, started from that checkout "
            "and measured in the same run.\n"
        )
    for label, m in o["models"].items():
        ip = m["in_process_images_per_s"]
        servers = dict(m["servers"])
        naive = servers.get("naive infer")
        parts.append(
            f"### {label}: in-process onnxruntime {ip['1']:,.0f} images/s at batch 1, {ip['64']:,.0f} at batch 64\n"
        )
        parts.append(
            "| server, API | 1 caller: req/s (p50) | x naive | 16 callers: req/s (p99) | x naive | 64-image: images/s | x limit |"
        )
        parts.append("|---|---|---|---|---|---|---|")
        rows = {f"echo {k}": v for k, v in o["echo"].items()} | servers
        for key, runs in rows.items():
            rpc = key.split()[-1]
            echo64 = o["echo"]["infer" if rpc == "infer" else "classify"]["64x4"]["requests_per_s"]
            limit = 1 / (1 / echo64 + 64 / ip["64"])
            c1, c16, big = runs["1"], runs["16"], runs["64x4"]
            r1 = f"{c1['requests_per_s'] / naive['1']['requests_per_s']:.2f}x" if naive else ""
            r16 = f"{c16['requests_per_s'] / naive['16']['requests_per_s']:.2f}x" if naive else ""
            xl = "" if key.startswith("echo") else f"{big['images_per_s'] / (limit * 64):.2f}"
            parts.append(
                f"| {key} | {c1['requests_per_s']:,.0f} ({c1['latency_ms']['p50']:.2f}) | {r1} | "
                f"{c16['requests_per_s']:,.0f} ({c16['latency_ms']['p99']:.2f}) | {r16} | {big['images_per_s']:,.0f} | {xl} |"
            )
        parts.append("")
    return "\n".join(parts) + "\n"


def servicer_markdown(data: dict) -> str:
    """benchmarks/servicer_overhead.py's table: CPU per call without the transport."""
    rows = data["us_per_call"]
    names = list(next(iter(rows.values())))
    lines = [
        "\n### CPU per call without the transport (`python benchmarks/servicer_overhead.py`)\n",
        "The serving path's own cost: each handler called in a loop in process on core 0, CPU time per call "
        f"(best of the rounds, {data['calls']:,} calls a row, a tenth of that for 64 images), LeNet-size model. "
        "`naive` is the sixty-line server's ModelInfer; `nnserve` goes through the interceptor, data plane, "
        "validation and batcher.\n",
        "| checkout | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for root, values in rows.items():
        commit = data.get("commits", {}).get(root, Path(root).name)
        label = f"this build, {commit}" if Path(root) == ROOT else f"earlier build, {commit}"
        cells = [f"{values[n]:,.1f} us" if n in values else "n/a" for n in names]  # rows an older build lacks
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


def scaling_markdown(scaling: dict) -> str:
    rows = [
        f"| {key} | {runs['1']['requests_per_s']:,.0f} | {runs['2']['requests_per_s']:,.0f} | "
        f"{runs['2']['requests_per_s'] / runs['1']['requests_per_s']:.2f}x |"
        for key, runs in scaling.items()
    ]
    return (
        "## Workers: one port, several serving processes (`--workers`)\n\n"
        "The shipped classifier, single-image requests over 8 connections; **server and load generator "
        "unpinned, sharing this machine's 2 cores** (so the client takes CPU from the workers).\n\n"
        "| API, callers | 1 worker req/s | 2 workers req/s | scaling |\n|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
    )


# benchmarks/http_bench.py --write keeps its section of BENCHMARKS.md between these markers.
MARK_BEGIN, MARK_END = "<!-- http-bench:begin -->", "<!-- http-bench:end -->"


def write_markdown(results: dict) -> None:
    closed, ip = results["closed_loop"], results["in_process_images_per_s"]
    rows = []
    for key, runs in closed.items():
        cells = [f"{runs[c]['requests_per_s']:,.0f} / {runs[c]['latency_ms']['p99']:.1f}" for c in ("1", "16", "64")]
        big = runs.get("64x4")
        rows.append(
            f"| {key} | " + " | ".join(cells) + f" | {big['images_per_s']:,.0f} |"
            if big
            else f"| {key} | " + " | ".join(cells) + " | |"
        )
    echo16 = closed["echo classify"]["16"]["requests_per_s"]
    ours16 = closed["nnserve classify"]["16"]
    peer_keys = [k for k in closed if k.split()[0] in ("mlserver", "kserve")]
    best_peer = max(peer_keys, key=lambda k: closed[k]["16"]["requests_per_s"]) if peer_keys else None
    lines = [
        f"- nnserve (typed API) at 16 callers: **{ours16['requests_per_s']:,.0f} req/s = {ours16['requests_per_s'] / echo16:.0%} of the bare echo server** ({echo16:,.0f} req/s; target >= 70%).",
    ]
    if best_peer:
        peer16 = closed[best_peer]["16"]
        lines.append(
            f"- vs the best peer ({best_peer}, {peer16['requests_per_s']:,.0f} req/s, p99 {peer16['latency_ms']['p99']:.1f} ms): "
            f"**{ours16['requests_per_s'] / peer16['requests_per_s']:.2f}x** the throughput (target >= 2x), "
            f"p99 {ours16['latency_ms']['p99']:.1f} ms (target: no worse)."
        )
    if best_peer and "nnserve infer" in closed:
        oip16 = closed["nnserve infer"]["16"]
        peer16 = closed[best_peer]["16"]
        lines.append(
            f"- Same protocol on both sides (OIP ModelInfer): nnserve {oip16['requests_per_s']:,.0f} req/s, p99 {oip16['latency_ms']['p99']:.1f} ms: "
            f"**{oip16['requests_per_s'] / peer16['requests_per_s']:.2f}x** the best peer."
        )
    big = closed["nnserve classify"]["64x4"]["images_per_s"]
    lines.append(
        f"- 64-image requests at 4 callers: **{big:,.0f} images/s = {big / ip['64']:.0%} of in-process onnxruntime** at batch 64 on the same core ({ip['64']:,.0f} images/s; target >= 80%)."
    )
    sweeps = []
    for key, sweep in results.get("open_loop", {}).items():
        ok = [s["offered"] for s in sweep if s["latency_ms"]["p99"] < 50 and not s["errors"]]
        sweeps.append(f"| {key} | {max(ok) if ok else 0:,.0f} |")
    overhead_md = overhead_markdown(results["overhead"]) if "overhead" in results else ""
    per_call = RESULTS / "servicer_overhead.json"
    if per_call.exists():  # benchmarks/servicer_overhead.py, run beside this one
        overhead_md += servicer_markdown(json.loads(per_call.read_text()))
    if "scaling" in results:
        overhead_md += scaling_markdown(results["scaling"])
    text = f"""# Benchmarks

Generated by `python benchmarks/run.py` (classify) and `python benchmarks/generate_bench.py`
(generation) on this project's 2-core x86_64 machine: {results["pinning"]}. Each figure is one run
of {results["seconds_per_run"]:.0f} s after a 1 s warm-up, measured side by side in the same run; latency is
measured by `nnserve loadtest` from the intended send time.

{overhead_md}
## Classify: the targets of the first round

{chr(10).join(lines)}

## Classify: closed loop, single-image requests (requests/s / p99 ms) and 64-image requests

In-process onnxruntime on one thread: {ip["1"]:,.0f} images/s at batch 1, {ip["16"]:,.0f} at batch 16,
{ip["64"]:,.0f} at batch 64 (the compute ceiling).

| server, API | 1 caller | 16 callers | 64 callers | 64-image requests, 4 callers (images/s) |
|---|---|---|---|---|
{chr(10).join(rows)}

![throughput vs concurrency](benchmarks/results/throughput_vs_concurrency.png)

## Open loop: highest offered rate with p99 under 50 ms (Poisson arrivals)

| server, API | requests/s |
|---|---|
{chr(10).join(sweeps)}

![p99 vs offered load](benchmarks/results/p99_vs_offered_load.png)
"""
    rows_ip = "\n".join(
        f"| {model} | {v['1']:,.0f} | {v['64']:,.0f} |" for model, v in results.get("in_process_rows_per_s", {}).items()
    )
    restore = results.get("restore", {})
    text += (
        f"""
## In-process onnxruntime, every shipped model (one thread, core 0; rows/s)

| model | batch 1 | batch 64 |
|---|---|---|
{rows_ip}

## Restore (nnserve restore service, tensor input)

| scenario | images/s | p99 ms |
|---|---|---|
"""
        + "\n".join(f"| {k} | {v['images_per_s']:,.0f} | {v['latency_ms']['p99']:.1f} |" for k, v in restore.items())
        + "\n"
    )
    generate = RESULTS / "generate.json"
    if generate.exists():
        g = json.loads(generate.read_text())
        grows = [
            f"| {k} | {v.get('step_batching_on', {}).get('images_per_s', '')} | {v.get('step_batching_off', {}).get('images_per_s', '')} |"
            for k, v in g["results"].items()
        ]
        text += f"""
## Generation (`python benchmarks/generate_bench.py`; {g["pinning"]})

Single-image requests, images/s with step-level batching on and off:

| scenario | on | off |
|---|---|---|
{chr(10).join(grows)}

Step-level batching with 16 concurrent single-image requests at DDIM 50: **{g["step_batching_ratio_c16_ddim50"]}x** the images/s without it (target >= 2x).
"""
    speed = RESULTS / "model_speed.md"
    if speed.exists():  # benchmarks/model_speed.py, run beside this one
        text += "\n## Model speed: INT8 and DPM-Solver++ (`python benchmarks/model_speed.py`)\n\n" + speed.read_text()
    analysis = ROOT / "benchmarks" / "analysis.md"
    if analysis.exists():  # the hand-written reading of these figures, kept beside the generated tables
        text += "\n" + analysis.read_text()
    # benchmarks/http_bench.py --write keeps its section between markers: a rewrite here carries it over.
    previous = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else ""
    if MARK_BEGIN in previous and MARK_END in previous:
        start, end = previous.index(MARK_BEGIN), previous.index(MARK_END) + len(MARK_END)
        text = text.rstrip("\n") + "\n\n" + previous[start:end] + "\n"
    (ROOT / "BENCHMARKS.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
