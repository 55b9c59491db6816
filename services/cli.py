"""The ``nnserve`` command: run services, call them, check their health, start the whole suite.

nnserve up                                  # every service on the shipped models
nnserve serve classify --port 50051         # one service (flags or NNSERVE_CLASSIFY_* env)
nnserve classify shirt.png --top-k 3        # call it (--tls-ca-file, --token-file for a secured one)
nnserve health 127.0.0.1:50051              # exit 0 when SERVING
nnserve promote classifier 1 2              # publish a version under a new number
nnserve COMMAND --help                      # every option, with its default
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.cliargs import EXIT_STATUS, HelpFormatter, bounded


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

    def required(self, field: str) -> bool:
        """Whether the service cannot start without the model that ``field`` names."""
        optional = tuple(getattr(self.settings, "optional_model_settings", ()))
        return not self.models_optional and field not in optional

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


SCALE_HELP = "enlarge each written PNG this many times, nearest-neighbour, so 28x28 images are easy to see"
ROUND_ROBIN_HELP = (
    "spread calls over every address --address resolves to, dns:///host:port for replicas "
    "(default: off, one connection)"
)


class CommandError(Exception):
    """A problem on this side (an option, a file): printed as one line, exit status 2."""


def _read_files(paths: Sequence[str], what: str) -> list[bytes]:
    contents = []
    for path in paths:
        try:
            contents.append(Path(path).read_bytes())
        except OSError as exc:
            raise CommandError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return contents


def _write(path: Path, data: bytes, scale: int = 1) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_scaled(data, scale))
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None


def _scaled(png: bytes, scale: int) -> bytes:
    """``png`` enlarged ``scale`` times with nearest-neighbour sampling, so its pixels stay sharp."""
    if scale == 1:
        return png
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png))
    out = io.BytesIO()
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(out, format="PNG")
    return out.getvalue()


def _channel(args: argparse.Namespace) -> Any:
    """A blocking channel to ``--address`` with the command's TLS, token and round-robin options."""
    from services.client import channel_options
    from services.connect import blocking_channel

    return blocking_channel(args.address, args, channel_options(round_robin=getattr(args, "round_robin", False)))


def _call_failed(args: argparse.Namespace, channel: Any, exc: Any, wanted: str) -> int:
    """Print why a call failed, in one line; for UNIMPLEMENTED, name the services that are there."""
    import grpc

    code, details = exc.code(), exc.details()
    line = f"nnserve {args.command}: {code.name}: {details}"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        from services.connect import services_at

        there = services_at(channel, timeout=min(args.timeout, 5.0))
        # The service APIs; nnserve.model.v1.ModelInfo is on every server and tells nothing here.
        ours = [s for s in there if s.startswith("nnserve.v1.")] or there
        if ours and wanted not in there:
            line = (
                f"nnserve {args.command}: {args.address} serves {', '.join(ours)}, not {wanted}: "
                f"is --address the {args.command} service's port?"
            )
    elif code == grpc.StatusCode.UNAVAILABLE:
        line += f" (is a service listening at {args.address}? with TLS, pass --tls-ca-file)"
    print(line, file=sys.stderr)
    return 1


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    module = __import__(f"{SERVICES[args.service].module}.__main__", fromlist=["main"])
    return int(module.main(rest))


def _classify(args: argparse.Namespace) -> int:
    import grpc

    from services.client import ClassifyClient
    from services.proto.nnserve.v1 import classify_pb2

    images = _read_files(args.images, "image")
    wanted = classify_pb2.DESCRIPTOR.services_by_name["ClassifyService"].full_name
    with _channel(args) as channel:
        try:
            reply = ClassifyClient(args.address, channel=channel).classify(
                images=images, top_k=args.top_k, timeout=args.timeout, model_name=args.model
            )
        except grpc.RpcError as exc:
            return _call_failed(args, channel, exc, wanted)
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
        return 0
    for path, result in zip(args.images, reply.classifications, strict=True):
        top = ", ".join(f"{p.label} {p.probability:.1%}" for p in result.predictions)
        flag = "  [out of distribution]" if result.out_of_distribution else ""
        print(f"{path}: {top}  (ood score {result.ood_score:.2f}){flag}")
    return 0


def _restore(args: argparse.Namespace) -> int:
    import grpc

    from services.client import RestoreClient
    from services.proto.nnserve.v1 import restore_pb2

    if args.masks and len(args.masks) != len(args.images):
        raise CommandError(f"--masks: {len(args.masks)} masks for {len(args.images)} images (give one per image)")
    images = _read_files(args.images, "image")
    masks = _read_files(args.masks, "mask")
    wanted = restore_pb2.DESCRIPTOR.services_by_name["RestoreService"].full_name
    with _channel(args) as channel:
        try:
            reply = RestoreClient(args.address, channel=channel).restore(
                images=images, masks=masks, timeout=args.timeout
            )
        except grpc.RpcError as exc:
            return _call_failed(args, channel, exc, wanted)
    for path, result in zip(args.images, reply.restorations, strict=True):
        target = args.out / f"{Path(path).stem}.restored.png"
        _write(target, result.png, args.scale)
        flag = "  [anomalous]" if result.anomalous else ""
        print(f"{path} -> {target}  (anomaly score {result.anomaly_score:.4f}){flag}")
    return 0


DIFFUSION_ONLY = ("sampler", "steps", "eta", "guidance_scale")


def _generate(args: argparse.Namespace) -> int:
    import grpc

    from services.client import GenerateClient
    from services.proto.nnserve.v1 import generate_pb2

    if args.model == "gan":
        given = [f"--{name.replace('_', '-')}" for name in DIFFUSION_ONLY if getattr(args, name) is not None]
        if given:
            raise CommandError(f"{', '.join(given)}: only for --model diffusion (the GAN samples in one call)")
    options = dict(
        model=args.model,
        count=args.count,
        labels=args.label,
        seed=args.seed,
        output="grid" if args.out.suffix == ".png" else "pngs",
        sampler=args.sampler or "default",
        steps=args.steps or 0,
        eta=args.eta or 0.0,
        guidance_scale=args.guidance_scale,
    )
    wanted = generate_pb2.DESCRIPTOR.services_by_name["GenerateService"].full_name
    # A bar redrawn with \r is for a person at a terminal; in a log or a pipe it is noise.
    draw = sys.stderr.isatty()
    with _channel(args) as channel:
        client = GenerateClient(args.address, channel=channel)
        try:
            if args.model == "diffusion":
                reply = None
                for event in client.stream(timeout=args.timeout, **options):
                    if event.HasField("progress"):
                        if draw:
                            p = event.progress
                            bar = "#" * int(30 * p.step / p.total_steps)
                            print(f"\r  sampling [{bar:<30}] step {p.step}/{p.total_steps}", end="", file=sys.stderr)
                    else:
                        reply = event.result
                if draw:
                    print(file=sys.stderr)
            else:
                reply = client.generate(timeout=args.timeout, **options)
        except grpc.RpcError as exc:
            if draw:
                print(file=sys.stderr)
            return _call_failed(args, channel, exc, wanted)
    assert reply is not None
    if reply.grid_png:
        _write(args.out, reply.grid_png, args.scale)
        written = [args.out]
    else:
        written = []
        for i, png in enumerate(reply.pngs):
            written.append(args.out / f"{args.model}-{reply.seed}-{i:03d}-class{reply.labels[i]}.png")
            _write(written[-1], png, args.scale)
    shown = ", ".join(map(str, written[:4])) + (" ..." if len(written) > 4 else "")
    print(f"{len(reply.labels)} images from {reply.model_name}/{reply.model_version}, seed {reply.seed} -> {shown}")
    return 0


PROMOTE_DESCRIPTION = """\
Copy MODEL/FROM_VERSION to MODEL/TO_VERSION in the repository, rewriting the version in every
manifest (a manifest's version must equal its directory's number: a hand copy is refused at load).
The copy is verified like serving verifies it, then renamed into place at once, so running
services pick it up whole at their next poll (model_poll_interval_s) or on SIGHUP.

  nnserve promote classifier 1        # -> classifier/2 (one above the highest)
  nnserve promote classifier 1 5"""


def _promote(args: argparse.Namespace) -> int:
    from services.promote import PromoteError, promote

    try:
        version, precisions = promote(args.model_repository, args.model, args.from_version, args.to_version)
    except PromoteError as exc:
        raise CommandError(str(exc)) from None
    target = args.model_repository / args.model / str(version)
    print(f"{args.model}/{args.from_version} -> {args.model}/{version} ({', '.join(precisions)}) in {target}")
    return 0


def _describe(args: argparse.Namespace) -> int:
    """The model cards of the models a service serves (nnserve.model.v1.ModelInfo, on every service)."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from services.client import ModelInfoClient
    from services.client.modelinfo import format_card
    from services.core.modelinfo import SERVICE_NAME

    with _channel(args) as channel:
        client = ModelInfoClient(args.address, channel=channel)
        try:
            if args.model:
                cards = [client.describe(args.model, args.version, timeout=args.timeout)]
            else:
                cards = client.list(timeout=args.timeout)
        except grpc.RpcError as exc:
            return _call_failed(args, channel, exc, SERVICE_NAME)
    if args.json:
        documents = [MessageToDict(card, preserving_proto_field_name=True) for card in cards]
        print(json.dumps(documents[0] if args.model else {"models": documents}, indent=2))
        return 0
    print("\n\n".join(format_card(card) for card in cards))
    return 0


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(args) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if status == "SERVING" else 1


def _up(args: argparse.Namespace) -> int:
    """Start every service whose models are in the repository; stop them all on Ctrl-C/SIGTERM."""
    from services.core.repository import ModelRepository

    repository = ModelRepository(args.model_repository)
    present = set(repository.models())
    wanted = [s for s in SERVICES.values() if not args.only or s.name in args.only]
    from services.processes import Launched, LaunchError, launch, wait_until_serving

    state = Path(tempfile.mkdtemp(prefix="nnserve-up-"))
    children: list[tuple[ServiceSpec, Launched]] = []
    for spec in wanted:
        missing = [(field, m) for field, m in zip(spec.model_settings, spec.models, strict=True) if m not in present]
        if spec.models and (len(missing) == len(spec.models) or any(spec.required(f) for f, _ in missing)):
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
        flags = [
            "--host",
            args.host,
            "--port",
            str(spec.port + args.port_offset),
            "--metrics-port",
            str(spec.metrics_port + args.port_offset),
            "--metrics-host",
            args.host,
            *extra,
        ]
        children.append((spec, launch(spec.module, flags, state / f"{spec.name}.json", name=spec.name)))
    if not children:
        print("nothing to start", file=sys.stderr)
        return 1

    def stop_all(*_: object) -> None:
        for _spec, child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    try:
        wait_until_serving([child for _, child in children], args.start_timeout)
    except LaunchError as exc:
        print(exc, file=sys.stderr)
        stop_all()
        return 1
    print("\nnnserve is up:\n")
    for spec, child in children:
        info = child.info
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
    codes = [child.proc.wait() for _, child in children]
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

    up = sub.add_parser("up", help="start every service on the shipped models", formatter_class=HelpFormatter)
    up.add_argument(
        "--model-repository",
        default=os.environ.get("NNSERVE_MODEL_REPOSITORY", "models"),
        help="the model repository to serve ($NNSERVE_MODEL_REPOSITORY when set)",
    )
    up.add_argument("--host", default="127.0.0.1", help="address every service binds (0.0.0.0: every interface)")
    up.add_argument("--port-offset", type=int, default=0, help="add this to every default port")
    up.add_argument(
        "--only", nargs="*", choices=sorted(SERVICES), help="start only these services (default: all of them)"
    )
    up.add_argument(
        "--start-timeout", type=bounded(float, 0.001), default=120.0, help="seconds to wait for every service"
    )

    classify = sub.add_parser(
        "classify", help="classify image files", formatter_class=HelpFormatter, epilog=EXIT_STATUS
    )
    classify.add_argument("images", nargs="+", help="image files (PNG, JPEG, ... any size; 28x28 grayscale is native)")
    _client_arguments(classify, "127.0.0.1:50051", 30.0)
    classify.add_argument("--top-k", type=bounded(int, 1, 10), default=3, help="classes per image, most probable first")
    classify.add_argument(
        "--model",
        default="",
        metavar="NAME",
        help="model to ask, e.g. classifier_robust (the adversarially trained one); default: the service's",
    )
    classify.add_argument(
        "--json", action="store_true", help="print the reply as JSON with the proto's field names (default: text)"
    )

    restore = sub.add_parser(
        "restore", help="denoise or inpaint image files", formatter_class=HelpFormatter, epilog=EXIT_STATUS
    )
    restore.add_argument("images", nargs="+", help="image files to restore")
    restore.add_argument(
        "--masks", nargs="*", default=[], help="damage masks, one per image, white = inpaint (default: none, denoise)"
    )
    restore.add_argument(
        "--out", type=Path, default=Path("restored"), help="directory for the restored PNGs (IMAGE.restored.png)"
    )
    restore.add_argument("--scale", type=bounded(int, 1, 32), default=1, help=SCALE_HELP)
    _client_arguments(restore, "127.0.0.1:50052", 30.0)

    generate = sub.add_parser(
        "generate",
        help="generate images with the GAN or the diffusion model",
        formatter_class=HelpFormatter,
        epilog=EXIT_STATUS,
    )
    generate.add_argument("--model", choices=["gan", "diffusion"], default="gan", help="which generator")
    generate.add_argument(
        "--count",
        type=bounded(int, 1),
        default=16,
        help="images to make (the service's max_count caps it, 64 by default)",
    )
    generate.add_argument(
        "--label",
        type=bounded(int, 0),
        action="append",
        default=[],
        help="class id 0-9: once for every image, or once per image (default: random classes)",
    )
    generate.add_argument(
        "--seed", type=bounded(int, 0, 2**64 - 1), default=None, help="same seed, same images (default: random)"
    )
    generate.add_argument(
        "--sampler",
        choices=["ddim", "ddpm", "dpm++"],
        default=None,
        help="diffusion only: the sampler (default: the model's, DPM-Solver++ for the shipped denoiser)",
    )
    generate.add_argument(
        "--steps",
        type=bounded(int, 1),
        default=None,
        help="diffusion only: denoising steps (default: the sampler's, 10 for DPM-Solver++, 50 for DDIM/DDPM)",
    )
    generate.add_argument(
        "--eta", type=bounded(float, 0.0, 1.0), default=None, help="diffusion only: DDIM noise, 0-1 (default: 0)"
    )
    generate.add_argument(
        "--guidance-scale",
        type=bounded(float, 0.0, 20.0),
        default=None,
        help="diffusion only: classifier-free guidance, 0-20, 1 = off (default: the model's)",
    )
    generate.add_argument(
        "--out",
        type=Path,
        default=Path("generated.png"),
        help="a .png file (one grid of every image) or a directory (one PNG per image)",
    )
    generate.add_argument("--scale", type=bounded(int, 1, 32), default=1, help=SCALE_HELP)
    _client_arguments(generate, "127.0.0.1:50053", 300.0)

    promote = sub.add_parser(
        "promote",
        help="publish a model version under a new version number (copy + manifest rewrite)",
        description=PROMOTE_DESCRIPTION,
        formatter_class=HelpFormatter,
        epilog=EXIT_STATUS,
    )
    promote.add_argument("model", help="model name, e.g. classifier")
    promote.add_argument("from_version", type=bounded(int, 1), help="the version to copy")
    promote.add_argument(
        "to_version",
        type=bounded(int, 1),
        nargs="?",
        default=None,
        help="the new version number (default: one above the highest)",
    )
    promote.add_argument(
        "--model-repository",
        type=Path,
        default=Path(os.environ.get("NNSERVE_MODEL_REPOSITORY", "models")),
        help="the model repository ($NNSERVE_MODEL_REPOSITORY when set)",
    )

    describe = sub.add_parser(
        "describe",
        help="show the model cards of a service's models (task, labels, metrics, provenance, checksum)",
        formatter_class=HelpFormatter,
        epilog=EXIT_STATUS,
    )
    _client_arguments(describe, "127.0.0.1:50051", 10.0)
    describe.add_argument("--model", default="", metavar="NAME", help="one model (default: every model served there)")
    describe.add_argument("--version", default="", help="with --model: the version expected (default: the served one)")
    describe.add_argument(
        "--json", action="store_true", help="print the cards as JSON with the proto's field names (default: text)"
    )

    health = sub.add_parser("health", help="grpc.health.v1 check; exit 0 when SERVING", formatter_class=HelpFormatter)
    health.add_argument(
        "address",
        nargs="?",
        default=os.environ.get("NNSERVE_HEALTH_TARGET", "127.0.0.1:50051"),
        help="host:port (default: $NNSERVE_HEALTH_TARGET or 127.0.0.1:50051)",
    )
    health.add_argument(
        "--service", default="", help="a service name, e.g. nnserve.v1.ClassifyService (default: the whole server)"
    )
    health.add_argument("--timeout", type=bounded(float, 0.001), default=5.0, help="seconds to wait for the answer")
    from services.connect import add_connection_arguments

    add_connection_arguments(health)
    return parser


def _client_arguments(parser: argparse.ArgumentParser, address: str, timeout: float) -> None:
    """--address, --round-robin, --timeout and the TLS/token options every client command takes."""
    from services.connect import add_connection_arguments

    parser.add_argument("--address", default=address, help="host:port of the service")
    parser.add_argument("--round-robin", action="store_true", help=ROUND_ROBIN_HELP)
    parser.add_argument(
        "--timeout", type=bounded(float, 0.001), default=timeout, help="seconds before the call gives up"
    )
    add_connection_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "serve":
        return _serve(args, rest)
    if args.command == "loadtest":
        from services.loadtest import main as loadtest_main

        return loadtest_main(rest)
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    handlers = {
        "classify": _classify,
        "restore": _restore,
        "generate": _generate,
        "health": _health,
        "describe": _describe,
        "up": _up,
        "promote": _promote,
    }
    from services.connect import ConnectionOptionError

    try:
        return handlers[args.command](args)
    except (CommandError, ConnectionOptionError) as exc:
        print(f"nnserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C during a call: the call is cancelled, no traceback
        print(f"\nnnserve {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
