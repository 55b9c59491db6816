"""``python -m services.classify`` (or ``nnserve serve classify``): the classify gRPC service."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from services.classify.model import ClassifierModel
from services.classify.servicer import ClassifyServicer
from services.core import oip
from services.core.deployment import ModelSlot
from services.core.metrics import Metrics
from services.core.server import Service
from services.core.server import main as service_main
from services.core.settings import ClassifySettings
from services.proto.nnserve.v1 import classify_pb2, classify_pb2_grpc

SERVICE_NAME = classify_pb2.DESCRIPTOR.services_by_name["ClassifyService"].full_name


def build(settings: ClassifySettings, registry: CollectorRegistry | None = None) -> Service:
    """Load and warm the classifier, and wire model, batcher and servicers together."""
    metrics = Metrics(registry or CollectorRegistry(), "classify")
    slot = ModelSlot(
        settings,
        settings.model_name,
        metrics,
        lambda manifest: ClassifierModel(manifest, settings.max_images_per_request, settings.max_request_pixels),
        settings.model_version,
    )
    current = slot.current
    service = Service(
        name="classify",
        metrics=metrics,
        batchers=[slot],
        slots=[slot],
        models={current.manifest.name: str(current.number)},
    )
    servicer = ClassifyServicer(slot, settings.default_top_k)
    service.add_servicer(classify_pb2_grpc.add_ClassifyServiceServicer_to_server, servicer, SERVICE_NAME)
    oip_servicer = oip.InferenceServicer([oip.HostedModel(slot)], settings.max_images_per_request)
    service.add_servicer(oip.add_to_server, oip_servicer, oip.SERVICE_NAME)
    return service


def main(argv: Sequence[str] | None = None) -> int:
    return service_main("nnserve serve classify", ClassifySettings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
