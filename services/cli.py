"""The ``nnserve`` command: run services, call them, check their health, start the whole suite.

nnserve up                                  # every service on the shipped models
nnserve serve classify --port 50051         # one service (flags or NNSERVE_CLASSIFY_* env)
nnserve classify shirt.png --top-k 3        # call it
nnserve health 127.0.0.1:50051              # exit 0 when SERVING
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class ServiceSpec:
    """How ``nnserve up`` starts one service: its module and its settings class, which gives the
    default ports, the settings that name repository models and the command to try."""

    name: str
    module: str
    settings: Any  # the service's pydantic-settings class

    def _default(self, field: str) -> Any:
        return self.settings.model_fields[field].default

    @property
    def port(self) -> int:
        return int(self._default("port"))

    @property
    def metrics_port(self) -> int:
        return int(self._default("metrics_port"))

    @property
    def http_port(self) -> int | None:
        """The default HTTP/REST port; None for a service without one (the console is HTTP itself)."""
        field = self.settings.model_fields.get("http_port")
        return None if field is None or field.default is None else int(field.default)

    @property
    def model_settings(self) -> tuple[str, ...]:
        return tuple(getattr(self.settings, "model_settings", ()))

    @property
    def models(self) -> tuple[str, ...]:
        """The repository models the service serves by default."""
        return tuple(str(self._default(field)) for field in self.model_settings)

    @property
    def models_optional(self) -> bool:
        return bool(getattr(self.settings, "models_optional", False))

    @property
    def example(self) -> str:
        return str(getattr(self.settings, "try_command", "") or "open http://{address}/ in a browser")


def _specs() -> dict[str, ServiceSpec]:
    from services.classify.settings import ClassifySettings
    from services.console.settings import ConsoleSettings
    from services.generate.settings import GenerateSettings
    from services.restore.settings import RestoreSettings

    return {
        "classify": ServiceSpec("classify", "services.classify", ClassifySettings),
        "restore": ServiceSpec("restore", "services.restore", RestoreSettings),
        "generate": ServiceSpec("generate", "services.generate", GenerateSettings),
        # The web console needs no models: it calls the three services above.
        "console": ServiceSpec("console", "services.console", ConsoleSettings),
    }


SERVICES = _specs()
# What `nnserve up` suggests trying over HTTP (README "HTTP" has every route).
CURL_EXAMPLES = {
    "classify": "curl -F image=@shirt.png {url}/v1/classify",
    "restore": "curl -H 'Content-Type: image/png' -H 'Accept: image/png' --data-binary @damaged.png "
    "{url}/v1/restore -o restored.png",
    "generate": "curl -H 'Accept: image/png' -H 'Content-Type: application/json' -d '{{\"count\": 16}}' "
    "{url}/v1/generate -o grid.png",
}


ROUND_ROBIN_HELP = "spread calls over every address --address resolves to (dns:///host:port for replicas)"


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    module = __import__(f"{SERVICES[args.service].module}.__main__", fromlist=["main"])
    return int(module.main(rest))


def _classify(args: argparse.Namespace) -> int:
    from services.client import ClassifyClient

    images = [Path(p).read_bytes() for p in args.images]
    try:
        with ClassifyClient(args.address, round_robin=args.round_robin) as client:
            reply = client.classify(images=images, top_k=args.top_k, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"nnserve classify: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(reply), indent=2))
        return 0
    for path, result in zip(args.images, reply.classifications, strict=True):
        top = ", ".join(f"{p.label} {p.probability:.1%}" for p in result.predictions)
        flag = "  [out of distribution]" if result.out_of_distribution else ""
        print(f"{path}: {top}  (ood score {result.ood_score:.2f}){flag}")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from services.client import RestoreClient

    images = [Path(p).read_bytes() for p in args.images]
    masks = [Path(p).read_bytes() for p in args.masks]
    try:
        with RestoreClient(args.address, round_robin=args.round_robin) as client:
            reply = client.restore(images=images, masks=masks, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"nnserve restore: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for path, result in zip(args.images, reply.restorations, strict=True):
        target = args.out / f"{Path(path).stem}.restored.png"
        target.write_bytes(result.png)
        flag = "  [anomalous]" if result.anomalous else ""
        print(f"{path} -> {target}  (anomaly score {result.anomaly_score:.4f}){flag}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from services.client import GenerateClient

    options = dict(
        model=args.model,
        count=args.count,
        labels=args.label,
        seed=args.seed,
        output="grid" if args.out.suffix == ".png" else "pngs",
        sampler=args.sampler,
        steps=args.steps,
        eta=args.eta,
        guidance_scale=args.guidance_scale,
    )
    try:
        with GenerateClient(args.address, round_robin=args.round_robin) as client:
            if args.model == "diffusion":
                reply = None
                for event in client.stream(timeout=args.timeout, **options):
                    if event.HasField("progress"):
                        p = event.progress
                        bar = "#" * int(30 * p.step / p.total_steps)
                        print(
                            f"\r  sampling [{bar:<30}] step {p.step}/{p.total_steps}",
                            end="",
                            file=sys.stderr,
                            flush=True,
                        )
                    else:
                        reply = event.result
                print(file=sys.stderr)
            else:
                reply = client.generate(timeout=args.timeout, **options)
    except grpc.RpcError as exc:
        print(f"nnserve generate: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    assert reply is not None
    if reply.grid_png:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(reply.grid_png)
        written = [args.out]
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        written = []
        for i, png in enumerate(reply.pngs):
            written.append(args.out / f"{args.model}-{reply.seed}-{i:03d}-class{reply.labels[i]}.png")
            written[-1].write_bytes(png)
    shown = ", ".join(map(str, written[:4])) + (" ..." if len(written) > 4 else "")
    print(f"{len(reply.labels)} images from {reply.model_name}/{reply.model_version}, seed {reply.seed} -> {shown}")
    return 0


def _health(args: argparse.Namespace) -> int:
    from services.client import check_health

    try:
        status = check_health(args.address, args.service, args.timeout)
    except grpc.RpcError as exc:
        print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _up(args: argparse.Namespace) -> int:
    """Start every service whose models are in the repository; stop them all on Ctrl-C/SIGTERM."""
    from services.core.repository import ModelRepository

    repository = ModelRepository(args.model_repository)
    present = set(repository.models())
    wanted = [s for s in SERVICES.values() if not args.only or s.name in args.only]
    state = Path(tempfile.mkdtemp(prefix="nnserve-up-"))
    children: list[tuple[ServiceSpec, subprocess.Popen[bytes], Path]] = []
    for spec in wanted:
        missing = [(field, m) for field, m in zip(spec.model_settings, spec.models, strict=True) if m not in present]
        if spec.models and (len(missing) == len(spec.models) or (missing and not spec.models_optional)):
            print(f"skipping {spec.name}: no {', '.join(m for _, m in missing)} in {repository.root}", file=sys.stderr)
            continue
        # A service whose models are optional starts with those present; the others are switched off.
        extra = [f"--{field.replace('_', '-')}=" for field, _ in missing]
        if spec.models:
            extra = ["--model-repository", str(repository.root), *extra]
        else:  # the console: point it at the services' ports (from the host when they bind every address)
            near = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
            extra = [f"--{s.name}-target={near}:{s.port + args.port_offset}" for s in SERVICES.values() if s.models]
        if spec.http_port is not None:
            extra += ["--http-port", str(spec.http_port + args.port_offset), "--http-host", args.host]
        port_file = state / f"{spec.name}.json"
        command = [
            sys.executable,
            "-m",
            spec.module,
            "--host",
            args.host,
            "--port",
            str(spec.port + args.port_offset),
            "--metrics-port",
            str(spec.metrics_port + args.port_offset),
            "--metrics-host",
            args.host,
            "--port-file",
            str(port_file),
            *extra,
        ]
        children.append((spec, subprocess.Popen(command), port_file))
    if not children:
        print("nothing to start", file=sys.stderr)
        return 1

    def stop_all(*_: object) -> None:
        for _spec, child, _file in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    deadline = time.monotonic() + args.start_timeout
    while not all(p.exists() for _, _, p in children):
        failed = [(s, c) for s, c, _ in children if c.poll() is not None]
        if failed or time.monotonic() > deadline:
            for spec, child in failed:
                print(f"{spec.name} exited with code {child.returncode}", file=sys.stderr)
            stop_all()
            return 1
        time.sleep(0.1)
    print("\nnnserve is up:\n")
    for spec, _, port_file in children:
        info = json.loads(port_file.read_text())
        address = f"{args.host}:{info['port']}"
        metrics = f"http://{args.host}:{info['metrics_port']}/metrics" if info["metrics_port"] else "off"
        models = ", ".join(f"{k}/{v}" for k, v in info["models"].items())
        where = f"grpc {address:<16}" if spec.models else f"web  http://{address}/"
        served = f" models {models}" if spec.models else ""
        print(f"  {spec.name:<9} {where} metrics {metrics:<32}{served}".rstrip())
        print(f"  {'':<9} try: {spec.example.format(address=address)}")
        if info.get("http_port"):
            http = f"http://{args.host}:{info['http_port']}"
            print(f"  {'':<9} http {http:<27} try: {CURL_EXAMPLES[spec.name].format(url=http)}")
    print("\nhealth: nnserve health ADDRESS    stop: Ctrl-C\n", flush=True)
    codes = [child.wait() for _, child, _ in children]
    return max(codes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="run one service (flags after the name: see 'nnserve serve NAME --help')", add_help=False
    )
    serve.add_argument("service", choices=sorted(SERVICES))

    sub.add_parser("loadtest", help="load-test a service (see 'nnserve loadtest --help')", add_help=False)

    up = sub.add_parser("up", help="start every service on the shipped models")
    up.add_argument("--model-repository", default=os.environ.get("NNSERVE_MODEL_REPOSITORY", "models"))
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port-offset", type=int, default=0, help="add this to every default port")
    up.add_argument("--only", nargs="*", choices=sorted(SERVICES), help="start only these services")
    up.add_argument("--start-timeout", type=float, default=120.0)

    classify = sub.add_parser("classify", help="classify image files")
    classify.add_argument("images", nargs="+")
    classify.add_argument("--address", default="127.0.0.1:50051")
    classify.add_argument("--round-robin", action="store_true", help=ROUND_ROBIN_HELP)
    classify.add_argument("--top-k", type=int, default=3)
    classify.add_argument("--timeout", type=float, default=30.0)
    classify.add_argument("--json", action="store_true", help="print the reply as JSON")

    restore = sub.add_parser("restore", help="denoise or inpaint image files")
    restore.add_argument("images", nargs="+")
    restore.add_argument("--masks", nargs="*", default=[], help="damage masks, one per image (white = inpaint)")
    restore.add_argument("--out", type=Path, default=Path("restored"))
    restore.add_argument("--address", default="127.0.0.1:50052")
    restore.add_argument("--round-robin", action="store_true", help=ROUND_ROBIN_HELP)
    restore.add_argument("--timeout", type=float, default=30.0)

    generate = sub.add_parser("generate", help="generate images with the GAN or the diffusion model")
    generate.add_argument("--model", choices=["gan", "diffusion"], default="gan")
    generate.add_argument("--count", type=int, default=16)
    generate.add_argument("--label", type=int, action="append", default=[], help="class id (repeat for one per image)")
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    generate.add_argument("--steps", type=int, default=50)
    generate.add_argument("--eta", type=float, default=0.0)
    generate.add_argument("--guidance-scale", type=float, default=None)
    generate.add_argument(
        "--out", type=Path, default=Path("generated.png"), help="a .png file (one grid) or a directory"
    )
    generate.add_argument("--address", default="127.0.0.1:50053")
    generate.add_argument("--round-robin", action="store_true", help=ROUND_ROBIN_HELP)
    generate.add_argument("--timeout", type=float, default=300.0)

    health = sub.add_parser("health", help="grpc.health.v1 check; exit 0 when SERVING")
    health.add_argument(
        "address",
        nargs="?",
        default=os.environ.get("NNSERVE_HEALTH_TARGET", "127.0.0.1:50051"),
        help="host:port (default: $NNSERVE_HEALTH_TARGET or 127.0.0.1:50051)",
    )
    health.add_argument("--service", default="", help="a service name; empty: the whole server")
    health.add_argument("--timeout", type=float, default=5.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "serve":
        return _serve(args, rest)
    if args.command == "loadtest":
        from services.loadtest import main as loadtest_main

        return loadtest_main(rest)
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    handlers = {"classify": _classify, "restore": _restore, "generate": _generate, "health": _health, "up": _up}
    return handlers[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
