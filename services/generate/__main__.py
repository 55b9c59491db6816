"""``python -m services.generate`` (or ``nnserve serve generate``): the generate gRPC service."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from services.core import oip
from services.core.continuous import StepBatcher
from services.core.deployment import Deployment, ModelSlot, StaticSlot
from services.core.errors import ModelLoadError, ModelNotFound
from services.core.hosting import make_batcher
from services.core.metrics import Metrics
from services.core.repository import ModelRepository
from services.core.runtime import OnnxModel
from services.core.server import Service
from services.core.server import main as service_main
from services.core.settings import GenerateSettings
from services.generate.model import DiffusionSchedule
from services.generate.servicer import DiffusionBackend, GanView, GenerateServicer
from services.proto.nnserve.v1 import generate_pb2, generate_pb2_grpc

SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["GenerateService"].full_name


def build(settings: GenerateSettings, registry: CollectorRegistry | None = None) -> Service:
    """Load whichever of the GAN and the diffusion denoiser are configured; at least one must load."""
    metrics = Metrics(registry or CollectorRegistry(), "generate")
    service = Service(name="generate", metrics=metrics)
    hosted: list[oip.HostedModel] = []
    gan: ModelSlot[GanView] | None = None
    diffusion: DiffusionBackend | None = None
    if settings.gan_model:
        gan = ModelSlot(settings, settings.gan_model, metrics, GanView.from_manifest)
        service.batchers.append(gan)
        service.slots.append(gan)
        hosted.append(oip.HostedModel(gan))
    if settings.diffusion_model:
        version = ModelRepository(settings.model_repository).resolve(settings.diffusion_model)
        runtime = OnnxModel(version, settings.providers, settings.threads, settings.allow_spinning)
        if settings.warmup:
            runtime.warmup(sorted({1, min(settings.max_rows_per_step, 64)}))
        try:
            schedule = DiffusionSchedule.from_manifest(version.manifest)
        except (KeyError, ValueError) as exc:
            raise ModelLoadError(
                f"{version.directory / 'manifest.json'}: no usable diffusion schedule: {exc}"
            ) from None
        stepper = StepBatcher(
            runtime.predict,
            name=version.name,
            output=version.manifest.outputs[0].name,
            max_rows_per_call=settings.max_rows_per_step,
            max_rows_in_flight=settings.max_rows_in_flight,
            max_waiting=settings.max_waiting_jobs,
            max_queue_wait_s=settings.max_job_wait_ms / 1000.0,
            enabled=settings.step_batching,
            metrics=metrics.for_model(version.name),
        )
        info = ("generate", version.name, str(version.version), runtime.provider, version.precision)
        metrics.model_info.labels(*info).set(1)
        diffusion = DiffusionBackend(version.name, version.version, stepper, schedule)
        service.batchers.append(stepper)
        # One-shot denoiser calls over OIP (ModelInfer) get a dynamic batcher of their own.
        one_shot = make_batcher(settings, runtime.predict, version.name, metrics, runtime.provider)
        service.batchers.append(one_shot)
        hosted.append(oip.HostedModel(StaticSlot(Deployment(version, runtime, one_shot, None))))
    if gan is None and diffusion is None:
        raise ModelNotFound("no generator configured: set gan_model and/or diffusion_model")
    service.models = {}
    if gan is not None:
        service.models[gan.current.manifest.name] = str(gan.current.number)
    if diffusion is not None:
        service.models[diffusion.name] = str(diffusion.version)
    servicer = GenerateServicer(gan, diffusion, settings.max_count, settings.max_step_rows_per_request)
    service.add_servicer(generate_pb2_grpc.add_GenerateServiceServicer_to_server, servicer, SERVICE_NAME)
    if hosted:
        service.add_servicer(oip.add_to_server, oip.InferenceServicer(hosted, settings.max_count), oip.SERVICE_NAME)
    return service


def main(argv: Sequence[str] | None = None) -> int:
    return service_main("nnserve serve generate", GenerateSettings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
