"""``python -m services.generate`` (or ``nnserve serve generate``): the generate gRPC service."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from services.core import oip
from services.core.continuous import StepBatcher
from services.core.dataplane import DataPlane
from services.core.deployment import ModelSlot
from services.core.entrypoint import main as service_main
from services.core.errors import ModelNotFound
from services.core.manifest import Manifest
from services.core.metrics import Metrics
from services.core.runtime import OnnxModel
from services.core.server import Service
from services.generate.model import DiffusionSchedule
from services.generate.servicer import DiffusionView, GanView, GenerateServicer
from services.generate.settings import GenerateSettings
from services.proto.nnserve.v1 import generate_pb2, generate_pb2_grpc

SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["GenerateService"].full_name


def build(settings: GenerateSettings, registry: CollectorRegistry | None = None) -> Service:
    """Load whichever of the GAN and the diffusion denoiser are configured; at least one must load.

    Both are model slots, so both hot-reload; the denoiser's view brings its step batcher, which
    runs sampling requests' steps over the same session that serves one-shot OIP calls.
    """
    metrics = Metrics(registry or CollectorRegistry(), "generate")
    service = Service(name="generate", metrics=metrics)
    gan: ModelSlot[GanView] | None = None
    diffusion: ModelSlot[DiffusionView] | None = None
    if settings.gan_model:
        gan = ModelSlot(settings, settings.gan_model, metrics, GanView.from_manifest)
        service.slots.append(gan)
    if settings.diffusion_model:

        def diffusion_view(manifest: Manifest, runtime: OnnxModel) -> DiffusionView:
            stepper = StepBatcher(
                runtime.predict,
                name=manifest.name,
                output=manifest.outputs[0].name,
                max_rows_per_call=settings.max_rows_per_step,
                max_rows_in_flight=settings.max_rows_in_flight,
                max_waiting=settings.max_waiting_jobs,
                max_queue_wait_s=settings.max_job_wait_ms / 1000.0,
                enabled=settings.step_batching,
                metrics=metrics.for_model(manifest.name, manifest.version),
                release=runtime.release_memory,
            )
            return DiffusionView(DiffusionSchedule.from_manifest(manifest), stepper)

        diffusion = ModelSlot(
            settings,
            settings.diffusion_model,
            metrics,
            diffusion_view,
            warmup_rows=min(settings.max_rows_per_step, 64),
        )
        service.slots.append(diffusion)
    if gan is None and diffusion is None:
        raise ModelNotFound("no generator configured: set gan_model and/or diffusion_model")
    servicer = GenerateServicer(gan, diffusion, settings.max_count, settings.max_step_rows_per_request)
    service.add_servicer(generate_pb2_grpc.add_GenerateServiceServicer_to_server, servicer, SERVICE_NAME)
    oip_servicer = oip.InferenceServicer(DataPlane(service.slots), settings.max_count)
    service.add_servicer(oip.add_to_server, oip_servicer, oip.SERVICE_NAME)
    return service


def main(argv: Sequence[str] | None = None) -> int:
    return service_main("nnserve serve generate", GenerateSettings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
