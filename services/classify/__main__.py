"""``python -m services.classify`` (or ``nnserve serve classify``): the classify gRPC service."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from services.classify.model import ClassifierModel
from services.classify.servicer import ClassifyServicer
from services.core import oip
from services.core.batching import DynamicBatcher
from services.core.metrics import Metrics
from services.core.repository import ModelRepository
from services.core.runtime import OnnxModel
from services.core.server import Service
from services.core.server import main as service_main
from services.core.settings import ClassifySettings
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc

SERVICE_NAME = classify_pb2.DESCRIPTOR.services_by_name["ClassifyService"].full_name


def build(settings: ClassifySettings, registry: CollectorRegistry | None = None) -> Service:
    """Load and warm the classifier, and wire model, batcher and servicer together."""
    metrics = Metrics(registry or CollectorRegistry(), "classify")
    version = ModelRepository(settings.model_repository).resolve(settings.model_name, settings.model_version)
    runtime = OnnxModel(version, settings.providers, settings.threads, settings.allow_spinning)
    if settings.warmup:
        runtime.warmup(sorted({1, settings.max_batch_size}))
    model = ClassifierModel(version.manifest, settings.max_images_per_request)
    batcher = DynamicBatcher(
        runtime.predict,
        name=version.name,
        max_batch_size=settings.max_batch_size,
        max_delay_s=settings.max_delay_ms / 1000.0,
        max_queue_size=settings.max_queue_size,
        enabled=settings.batching,
        metrics=metrics.for_model(version.name),
    )
    metrics.model_info.labels("classify", version.name, str(version.version), runtime.provider).set(1)
    service = Service(name="classify", metrics=metrics, batchers=[batcher], models={version.name: str(version.version)})
    servicer = ClassifyServicer(model, batcher, version.version, settings.default_top_k)
    service.add_servicer(classify_pb2_grpc.add_ClassifyServiceServicer_to_server, servicer, SERVICE_NAME)
    hosted = oip.HostedModel(version.manifest, batcher, runtime.provider)
    service.add_servicer(
        oip.add_to_server, oip.InferenceServicer([hosted], settings.max_images_per_request), oip.SERVICE_NAME
    )
    return service


def main(argv: Sequence[str] | None = None) -> int:
    return service_main("nnserve serve classify", ClassifySettings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
